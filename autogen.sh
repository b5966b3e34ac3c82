#!/bin/sh
# Generate configure and Makefile.in from configure.ac and Makefile.am
# (needs the Debian packages autoconf and automake). Then:
#   ./configure && make && make install
set -e
cd "$(dirname "$0")"
autoreconf --install --force
