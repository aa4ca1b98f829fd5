#!/bin/bash
# One study of configs/experiments/ as a SLURM job array: array task i trains variant i of the study
# (python -m xception_pl sweep lists them) in runs/<study>/<variant>, with DDP, one task per GPU.
#
#   python -m xception_pl sweep configs/experiments/figure10.yaml --submit     # from the repository root
#   python -m xception_pl sweep configs/experiments/figure10.yaml --submit --sbatch='--nodes=2 --time=48:00:00'
#
# --submit runs `sbatch --array=0-(N-1) --job-name=<study> slurm/sweep.sh STUDY.yaml ...`, N taken from the
# study file; without --array this script stops at once and says so. Arguments after the study file go
# to every run's command line. Each array task is requeued on its own and resumes from its own run
# directory's newest checkpoint (--ckpt_path last): the run directory comes from the task id, not the job name.
#
#SBATCH --job-name=sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8          # one task per GPU: equal to the count in --gres
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=12           # DataLoader workers per GPU (configs/imagenet.yaml: num_workers 12)
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90          # 90 s before the limit, to the tasks: save hpc_ckpt_N.ckpt, requeue (RequeueOnSignal)
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued task appends to its output instead of truncating it
#SBATCH --output=slurm-%x-%A_%a.out  # one file per array task
#
# Cluster-specific settings: as slurm/train_imagenet.sh (NCCL_*, GLOO_SOCKET_IFNAME, MASTER_ADDR/PORT, PYTHON).

srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" ${PYTHON:-python} -m xception_pl sweep "$1" --task "${SLURM_ARRAY_TASK_ID:-}" --trainer.num_nodes "$SLURM_JOB_NUM_NODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" "${@:2}"
