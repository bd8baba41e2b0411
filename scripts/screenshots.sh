#!/usr/bin/env bash
# The README's screenshots (docs/archive.png, docs/job.png): the web app in the same headless
# Chromium the browser tests use, against the real API and worker with the tiny model.
# Needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs
POPCON_SCREENSHOTS="$PWD/docs" cargo test --test web screenshots_of_the_archive_and_a_job_page
ls -l docs/archive.png docs/job.png
