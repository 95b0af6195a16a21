#!/bin/sh
# Run me in a session: shows who the workload runs as and where.
echo "hello from $(id -un) (uid $(id -u)) in $(pwd)"
