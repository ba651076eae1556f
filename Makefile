# hiradix: the two commands are `make demo` and `make test`; each runs `make setup` first.
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-fast demo bench fuzz lint typecheck clean docs

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not e2e"

demo: setup
	$(PY) -m hiradix.integration.cli demo

# differential fuzzer against SGLang's default cache: MINUTES=60 make fuzz (TP=2: FUZZ_ARGS="--tp 2")
fuzz: setup
	$(PY) -m hiradix.integration.testbed.fuzz --minutes $(or $(MINUTES),10) --out out/fuzz $(FUZZ_ARGS)

bench: setup
	$(PY) benchmarks/bench_tree.py --trace ../shared/traces/mooncake_synthetic_trace.jsonl --json out/bench_tree.json

lint: setup
	.venv/bin/ruff check hiradix backends integration tests benchmarks
	.venv/bin/ruff format --check hiradix backends integration tests benchmarks

typecheck: setup
	.venv/bin/mypy

clean:
	rm -rf .venv out .pytest_cache .mypy_cache

docs: setup
	$(PY) scripts/update_readme.py README.md
