# `make demo` and `make test` do all set-up on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
S3RVER := $(VENV)/s3rver/node_modules/.bin/s3rver

# Byte-compile, before each target: where PYTHONDONTWRITEBYTECODE is set (as here), every CLI run
# would compile procsnap from source (0.3 s of a 0.45 s small dump), and the records' __init__
# methods, which procsnap/records.py otherwise compiles on every run. Only what changed is redone.
BYTECODE = $(PY) -m compileall -q procsnap && $(PY) -m procsnap.records >/dev/null

.PHONY: demo test bench bench-tree bench-cow bench-encoded bench-s3 bench-servers bench-stream bench-predump bench-migrate clean

$(STAMP): pyproject.toml
	# Debian programs the tests run, installed only when missing (one apt-get update, only then):
	# tmux, vim and top (tests/test_tty.py), gdb (test_views.py opens `procsnap core` files in it),
	# npm (it installs s3rver, the S3 server of test_objstore.py),
	# redis-server, nginx, memcached (tests/test_servers.py runs its own instances, own config and ports);
	# their Debian services, if the install started them, are stopped again: the tests never use them
	# openssl (test_stream.py makes a CA and certificates) and ip (its network namespace test)
	# nft and iptables (the network lock of live TCP connections, procsnap/objects/netlock.py)
	@missing=""; \
	command -v tmux >/dev/null || missing="$$missing tmux"; \
	command -v vim >/dev/null || missing="$$missing vim"; \
	command -v top >/dev/null || missing="$$missing procps"; \
	command -v gdb >/dev/null || missing="$$missing gdb"; \
	command -v npm >/dev/null || missing="$$missing nodejs npm"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v nginx >/dev/null || missing="$$missing nginx"; \
	command -v memcached >/dev/null || missing="$$missing memcached"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v nsenter >/dev/null || missing="$$missing util-linux"; \
	command -v nft >/dev/null || missing="$$missing nftables"; \
	command -v iptables >/dev/null || missing="$$missing iptables"; \
	if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing || exit 1; \
	  for s in redis-server nginx memcached; do case "$$missing" in *" $$s"*) \
	    service $$s stop >/dev/null 2>&1 || true;; esac; done; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat: a plain path in a .pth file; the default editable finder costs ~13 ms per start
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	# the tests' S3 server (tests/test_objstore.py): s3rver, a real S3 HTTP server on loopback, from npm
	test -x $(S3RVER) || npm install --no-audit --no-fund --silent --prefix $(VENV)/s3rver s3rver@3.7.1
	touch $(STAMP)

demo: $(STAMP)
	@$(BYTECODE)
	$(PY) demo/demo.py

test: $(STAMP)
	@$(BYTECODE)
	$(PY) -m pytest -q tests

# one table, procsnap beside CRIU when CRIU=path names its binary (bench/run.py says the knobs);
# the encodings and S3 have no CRIU counterpart: bench-encoded, bench-s3
# then migration (issue 13): the downtime at 1 and 4 GiB with and without pre-copy, and a lazy
# restore's time to first instruction (BENCH_MIGRATE_MIB, BENCH_LAZY_MIB override the sizes)
bench: $(STAMP)
	@$(BYTECODE)
	$(PY) bench/run.py
	BENCH_MIGRATE_MIB=$${BENCH_MIGRATE_MIB:-1024,4096} $(PY) bench/migrate.py
	BENCH_SIZES=$${BENCH_LAZY_MIB:-256,1024} $(PY) bench/lazy.py

bench-encoded: $(STAMP)
	@$(BYTECODE)
	$(PY) bench/encoded.py

bench-s3: $(STAMP)
	$(PY) bench/objstore.py

bench-stream: $(STAMP)
	@$(BYTECODE)
	$(PY) bench/stream.py

bench-tree: $(STAMP)
	@$(BYTECODE)
	$(PY) bench/tree.py

bench-cow: $(STAMP)
	@$(BYTECODE)
	$(PY) bench/cow.py

bench-servers: $(STAMP)
	@$(BYTECODE)
	$(PY) bench/servers.py

bench-predump: $(STAMP)
	@$(BYTECODE)
	$(PY) bench/predump.py

.PHONY: bench-lazy
bench-lazy: $(STAMP)
	@$(BYTECODE)
	$(PY) bench/lazy.py

bench-migrate: $(STAMP)
	@$(BYTECODE)
	$(PY) bench/migrate.py

# issue 12, goals 4 and 5: the --leave-running freeze window (in process, BENCH_PROFILE=1 for its
# profile) and procsnap's own peak memory (BENCH_MEMORY=SIZE:PATTERN,...; CRIU=path beside it)
.PHONY: bench-freeze bench-memory
bench-freeze: $(STAMP)
	@$(BYTECODE)
	$(PY) bench/freeze.py

bench-memory: $(STAMP)
	@$(BYTECODE)
	$(PY) bench/memory.py

clean:
	rm -rf $(VENV) build *.egg-info
