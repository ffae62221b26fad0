# Two commands on a fresh machine (Python >= 3.10 with venv):
#   make quickstart   install jmtl into .venv and train the offline quickstart (runs/quick)
#   make test         the test suite exactly as CI runs it (fresh .ci-venv, then pytest)
.PHONY: quickstart test

quickstart:
	python3 -m venv .venv
	.venv/bin/pip install -q -e ".[demo]"
	.venv/bin/jmtl train --config configs/quickstart.py --workdir runs/quick

test:
	bash .ci/run
