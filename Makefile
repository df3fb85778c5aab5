# `make demo` and `make test` do all set-up on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
S3RVER := $(VENV)/s3rver/node_modules/.bin/s3rver

.PHONY: demo test bench bench-tree bench-cow bench-encoded bench-s3 clean

$(STAMP): pyproject.toml
	# programs the tests run (tests/test_tty.py: tmux with vim and top), installed only when missing
	command -v tmux >/dev/null || apt-get install -y tmux
	command -v vim >/dev/null || apt-get install -y vim
	command -v top >/dev/null || apt-get install -y procps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat: a plain path in a .pth file; the default editable finder costs ~13 ms per start
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	# the tests' S3 server (tests/test_objstore.py): s3rver, a real S3 HTTP server on loopback, from npm
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	test -x $(S3RVER) || npm install --no-audit --no-fund --silent --prefix $(VENV)/s3rver s3rver@3.7.1
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
	$(PY) bench/encoded.py
	$(PY) bench/objstore.py

bench-encoded: $(STAMP)
	$(PY) bench/encoded.py

bench-s3: $(STAMP)
	$(PY) bench/objstore.py

bench-tree: $(STAMP)
	$(PY) bench/tree.py

bench-cow: $(STAMP)
	$(PY) bench/cow.py

clean:
	rm -rf $(VENV) build *.egg-info
