# `make demo` and `make test` do all set-up on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
S3RVER := $(VENV)/s3rver/node_modules/.bin/s3rver

.PHONY: demo test bench bench-tree bench-cow bench-encoded bench-s3 clean

$(STAMP): pyproject.toml
	# Debian programs the tests run, installed only when missing (one apt-get update, only then):
	# tmux, vim and top (tests/test_tty.py), gdb (test_views.py opens `procsnap core` files in it),
	# npm (it installs s3rver, the S3 server of test_objstore.py),
	# nft and iptables (the network lock of live TCP connections, procsnap/objects/netlock.py)
	@missing=""; \
	command -v tmux >/dev/null || missing="$$missing tmux"; \
	command -v vim >/dev/null || missing="$$missing vim"; \
	command -v top >/dev/null || missing="$$missing procps"; \
	command -v gdb >/dev/null || missing="$$missing gdb"; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	command -v nft >/dev/null || missing="$$missing nftables"; \
	command -v iptables >/dev/null || missing="$$missing iptables"; \
	if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat: a plain path in a .pth file; the default editable finder costs ~13 ms per start
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	# the tests' S3 server (tests/test_objstore.py): s3rver, a real S3 HTTP server on loopback, from npm
	test -x $(S3RVER) || npm install --no-audit --no-fund --silent --prefix $(VENV)/s3rver s3rver@3.7.1
	# byte-compile now: where PYTHONDONTWRITEBYTECODE is set, every CLI run would compile from source
	$(PY) -m compileall -q procsnap
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
