# `make demo` and `make test` do all set-up on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-tree bench-cow clean

$(STAMP): pyproject.toml
	# programs the tests run (tests/test_tty.py: tmux with vim and top), installed only when missing
	command -v tmux >/dev/null || apt-get install -y tmux
	command -v vim >/dev/null || apt-get install -y vim
	command -v top >/dev/null || apt-get install -y procps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat: a plain path in a .pth file; the default editable finder costs ~13 ms per start
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	# byte-compile now: where PYTHONDONTWRITEBYTECODE is set, every CLI run would compile from source
	$(PY) -m compileall -q procsnap
	# gdb: tests/test_views.py opens the core files of `procsnap core` in it
	command -v gdb >/dev/null || (apt-get update -q && apt-get install -y -q gdb)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/run.py

bench-tree: $(STAMP)
	$(PY) bench/tree.py

bench-cow: $(STAMP)
	$(PY) bench/cow.py

clean:
	rm -rf $(VENV) build *.egg-info
