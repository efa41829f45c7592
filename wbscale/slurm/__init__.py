"""Running wbscale on SLURM: job scripts, submission, status, preemption and requeue.

- :mod:`.render`: sbatch scripts from the templates in ``slurm/`` (single / multi node);
- :mod:`.submit`: ``wbscale slurm submit``; :mod:`.status`: ``status`` and ``cancel``;
- :mod:`.preemption`: the Lightning callback that checkpoints and requeues on a signal;
- :mod:`.site`: per-cluster defaults (``~/.config/wbscale/slurm.yaml``);
- :mod:`.record`: the run's job record (``slurm_jobs.jsonl``) and environment captures.

The cluster used by the tests is started by ``slurm/local_cluster.sh`` (``make slurm-up``).
"""
