"""``python -m opad.jobs``: many training jobs from one jobs file, run locally or as Ray tasks.

- ``spec``: read and check the jobs file (YAML or CSV, one row per concept) into :class:`Job` s;
- ``state``: what a job's output folder says (done, resumable, failed, config changed);
- ``runner``: one job's attempt (the trainer as a subprocess, resuming from its last checkpoint) and
  the local and Ray runners that run them all;
- ``cli``: the command line, progress lines and the summary table.

Ray is optional: ``import ray`` happens only in the Ray runner.
"""
