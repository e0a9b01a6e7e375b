# Two entry points on a fresh machine with only Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedseg-installed

DEMO_DATA := data/demo
DEMO_RESULTS := results
DEMO_SPEC := jobs/specs/demo.yaml

.PHONY: demo test lint format data clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on this disk; an open range downloads a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedseg simulate data --sites 3 --patients-per-site 100 --seed 0 --out $(DEMO_DATA)
	$(BIN)/fedseg simulate run $(DEMO_SPEC) --data $(DEMO_DATA) --out $(DEMO_RESULTS)

test: $(STAMP)
	@# pytest exits 5 when it collects no tests: treat that as a failure, loudly.
	$(BIN)/pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; \
	exit $$status

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(DEMO_DATA) $(DEMO_RESULTS)
