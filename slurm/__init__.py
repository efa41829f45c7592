"""The sbatch templates, installed as package data ``wbscale.sbatch`` (``wbscale slurm submit``)."""
