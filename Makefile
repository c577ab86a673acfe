# Packaging (see docs/install.md). Needs Debian/Ubuntu with dpkg-dev, gcc, zlib1g-dev, python3
# (with a shared libpython) and venv; the check targets run as root and apt-get install what else
# they need (lintian, curl, debootstrap, systemd-container).
#
#   make deb                 build dist/hxgwd_<version>_<arch>.deb (pinned venv in build/venv)
#   make deb-check           lintian + install/run/reload/stop/purge on this machine
#   make deb-systemd-check   the same package under real systemd in a bookworm container
#   make deb-repro           build twice from clean clones of HEAD and compare the .debs

PY      ?= python3
VENV    := build/venv
VERSION := $(shell sed -n "s/^__version__ *= *[\"']\([^\"']*\)[\"'].*/\1/p" hxgwd/__init__.py)
ARCH    := $(shell dpkg --print-architecture)
DEB     := dist/hxgwd_$(VERSION)_$(ARCH).deb
# what goes into the package (the check scripts do not)
SOURCES := $(shell find hxgwd debian -type f ! -name '*.pyc' ! -path '*/__pycache__/*' 2>/dev/null) \
           $(wildcard packaging/entry.py packaging/hxgwd.* packaging/build-deb.sh)

.PHONY: deb deb-check deb-systemd-check deb-repro clean-deb clean-venv

deb: $(DEB)

$(VENV)/.stamp: packaging/requirements-build.txt packaging/make-venv.sh
	PY=$(PY) packaging/make-venv.sh $(VENV)

$(DEB): $(VENV)/.stamp $(SOURCES)
	PYTHON=$(VENV)/bin/python packaging/build-deb.sh

deb-check: $(DEB)
	packaging/check-deb.sh $(DEB)

deb-systemd-check: $(DEB)
	packaging/check-systemd.sh $(DEB)

deb-repro:
	PY=$(PY) packaging/check-repro.sh

clean-deb:
	rm -rf build/pyi build/deb dist/hxgwd_*.deb

clean-venv:
	rm -rf $(VENV)
