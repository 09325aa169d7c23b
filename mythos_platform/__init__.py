"""The Ray layer of Mythos: config, data, training, tuning, serving and tracking.

Named `mythos_platform`, not `platform`: that name is a standard-library module that
Ray, torch and pip import, so a package called `platform` would shadow it.
"""

import os as _os

# Every progress line is its own: training runs side by side (a model and its baseline, a sweep's
# trials) print lines that differ only in numbers, which Ray's log deduplication folds into one
# "[repeated Nx across cluster]" line, so a trial's first lines never reached the terminal or the
# job's log. Ray reads the variable when it is first imported, and modules of this package import
# ray, so it is set here, before any of them runs; a value the user set is kept.
_os.environ.setdefault("RAY_DEDUP_LOGS", "0")
