# poststack-relay: `make run` starts sandbox + relay on loopback, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := .run
RELAY_PORT ?= 8587
SANDBOX_PORT ?= 8025
# The relay's /metrics, /healthz and /readyz listener (docs/metrics.md): empty
# keeps POSTSTACK_RELAY_METRICS_LISTEN or the default 127.0.0.1:9587; another
# HOST:PORT (or off) lets a second relay start on this machine, e.g.
# make run RELAY_PORT=8588 SANDBOX_PORT=8026 METRICS_LISTEN=127.0.0.1:9588
METRICS_LISTEN ?=
# One sandbox per SANDBOX_PORT: a second `make run` on another port leaves the first's alone.
SANDBOX_PID := $(RUN)/sandbox-$(SANDBOX_PORT).pid
# The sandbox's service key, from etc/sandbox.json (a sandbox secret, not a real one).
SANDBOX_SERVICE_KEY ?= sk_test_relay_service
export PYTHONPATH := .

.PHONY: run test interop venv cert clean lint typecheck

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test,redis]'
	touch $@

cert: $(RUN)/cert.pem

$(RUN)/cert.pem:
	mkdir -p $(RUN)
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
	    -keyout $(RUN)/key.pem -out $(RUN)/cert.pem -days 365 -subj /CN=localhost \
	    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
	chmod 600 $(RUN)/key.pem

run: venv cert
	@if [ -f $(SANDBOX_PID) ] && kill -0 $$(cat $(SANDBOX_PID)) 2>/dev/null; then \
	    kill $$(cat $(SANDBOX_PID)); sleep 1; fi
	$(VENV)/bin/twistd --pidfile $(SANDBOX_PID) --logfile $(RUN)/sandbox-$(SANDBOX_PORT).log \
	    poststack-sandbox --port $(SANDBOX_PORT) --interface 127.0.0.1 \
	    --db $(RUN)/sandbox-$(SANDBOX_PORT).sqlite3 --data etc/sandbox.json
	@echo
	@echo "Sandbox API: http://127.0.0.1:$(SANDBOX_PORT) (stored emails: curl http://127.0.0.1:$(SANDBOX_PORT)/_sandbox/emails)"
	@echo "Relay: implicit TLS on 127.0.0.1:$(RELAY_PORT), metrics on $(or $(METRICS_LISTEN),$(POSTSTACK_RELAY_METRICS_LISTEN),127.0.0.1:9587). Send a test mail with:"
	@echo "  $(PY) -m poststack_relay.sendtest --port $(RELAY_PORT) --cafile $(RUN)/cert.pem"
	@echo "Other clients: connect to localhost and trust $(RUN)/cert.pem (README.md, 'Trying it')."
	@echo "Stop with Ctrl-C."
	@echo
	trap 'kill $$(cat $(SANDBOX_PID)) 2>/dev/null' EXIT INT TERM; \
	POSTSTACK_RELAY_SERVICE_KEY=$(SANDBOX_SERVICE_KEY) \
	$(VENV)/bin/twistd -n --pidfile= poststack-relay --port $(RELAY_PORT) --interface 127.0.0.1 \
	    --tls-cert $(RUN)/cert.pem --tls-key $(RUN)/key.pem \
	    --api-url http://127.0.0.1:$(SANDBOX_PORT) --hostname localhost \
	    $(if $(METRICS_LISTEN),--metrics-listen $(METRICS_LISTEN))

# sslyze lives in its own venv: it pins an older cryptography than pyOpenSSL needs.
.venv-sslyze/.installed:
	test -x .venv-sslyze/bin/python || $(PYTHON) -m venv .venv-sslyze
	.venv-sslyze/bin/pip install --quiet sslyze==6.3.1
	touch $@

# mypy --strict first (a type error fails the target), then the tests, whose
# summary stays the last line.
test: venv .venv-sslyze/.installed
	$(VENV)/bin/mypy
	$(PY) -m pytest tests -q -p no:cacheprovider

# mypy --strict with the zope plugin over poststack_relay/ (pyproject.toml).
typecheck: venv
	$(VENV)/bin/mypy

# Real clients against relay + sandbox over loopback TLS (docs/interop.md):
# swaks, curl, msmtp, smtplib, Postfix, PHPMailer, the Ruby mail gem, and
# trusting make cert's certificate (tests/interop), nodemailer, and the
# translation cross-checked against mailparser on the MIME corpus.
# install.sh installs missing Debian packages with apt-get (needs root) and
# the pinned nodemailer; it is idempotent and fast when all is there.
interop: venv
	bash tests/interop/install.sh
	$(PY) -m pytest tests/interop tests/e2e/test_e2e_nodemailer.py tests/e2e/test_mime_crosscheck.py \
	    -q -p no:cacheprovider

clean:
	rm -rf $(RUN) build *.egg-info _trial_temp

# The benchmark (docs/performance.md): the relay against the baseline bridge
# (aiosmtpd + aiohttp) on this machine, one table of medians and ratios; raw
# figures in bench/results/. bench/run.py runs bench/install.sh first (the
# .venv-bench environment and nginx; apt-get needs root). The full run takes
# about 10 minutes; bench-smoke (tiny counts, one round) is what CI runs.
.PHONY: bench bench-smoke
bench: venv
	$(PY) bench/run.py

bench-smoke: venv
	$(PY) bench/run.py --smoke

# The container image (Containerfile; docs/deployment.md, "Containers"):
# `make image` builds poststack-relay:VERSION with podman (first the base
# image from Debian's packages, as no registry serves it here), `make sbom`
# its Python environment's CycloneDX SBOM in dist/. deploy/image/ holds both
# scripts; tests/test_container.py runs the image.
IMAGE_VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' poststack_relay/_version.py)
.PHONY: image sbom
image:
	bash deploy/image/build.sh $(IMAGE_VERSION)

sbom: image
	bash deploy/image/sbom.sh $(IMAGE_VERSION)
