#!/usr/bin/env bash
# The launchers of the downstream tasks: detection/ (mmdetection, COCO Mask R-CNN) and semantic_segmentation/
# (mmsegmentation, ADE20K UperNet). Their dist_*.sh and slurm_*.sbatch run this with their folder and job:
#   downstream.sh TASK dist_train CONFIG GPUS [args...]             torchrun (NNODES, NODE_RANK, MASTER_ADDR/PORT)
#   downstream.sh TASK dist_test CONFIG CHECKPOINT GPUS [args...]
#   downstream.sh TASK slurm_train [args...]                         srun; CONFIG (default: the shipped one),
#                                                                    PRETRAINED
#   downstream.sh TASK slurm_test [args...]                          srun; CONFIG, CHECKPOINT
# torchrun jobs run where they are called (CONFIG is a path from there); slurm jobs in the submit folder.
TASK=${1:?usage: downstream.sh detection|semantic_segmentation JOB [args...]}
JOB=${2:?usage: downstream.sh TASK dist_train|dist_test|slurm_train|slurm_test [args...]}
shift 2
LAUNCH_NO_CD=1 source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
case $TASK in
    detection) SHIPPED=detection/configs/mask_rcnn_bootmae_base_fpn_1x_coco.py ;;
    semantic_segmentation) SHIPPED=semantic_segmentation/configs/upernet_bootmae_base_512_160k_ade20k.py ;;
    *) echo "downstream.sh: unknown task $TASK (detection or semantic_segmentation)" >&2; exit 2 ;;
esac
case $JOB in
    dist_train)
        CONFIG=${1:?usage: dist_train.sh CONFIG GPUS [args...]}
        GPUS=${2:?usage: dist_train.sh CONFIG GPUS [args...]}
        shift 2
        LAUNCH_THREADS=${OMP_NUM_THREADS:-1} launch_nodes "$LAUNCH_ROOT/$TASK/train.py" "$CONFIG" \
            --launcher pytorch "$@" ;;
    dist_test)
        CONFIG=${1:?usage: dist_test.sh CONFIG CHECKPOINT GPUS [args...]}
        CHECKPOINT=${2:?usage: dist_test.sh CONFIG CHECKPOINT GPUS [args...]}
        GPUS=${3:?usage: dist_test.sh CONFIG CHECKPOINT GPUS [args...]}
        shift 3
        LAUNCH_THREADS=${OMP_NUM_THREADS:-1} launch_nodes "$LAUNCH_ROOT/$TASK/test.py" "$CONFIG" "$CHECKPOINT" \
            --launcher pytorch "$@" ;;
    slurm_train)
        cd "$LAUNCH_ROOT"
        # a requeued job continues from the work dir's newest checkpoint (--resume)
        launch_slurm -u "$TASK/train.py" "${CONFIG:-$SHIPPED}" \
            --pretrained "${PRETRAINED:?set PRETRAINED to a pretraining checkpoint}" --launcher slurm --resume "$@" ;;
    slurm_test)
        cd "$LAUNCH_ROOT"
        launch_slurm -u "$TASK/test.py" "${CONFIG:-$SHIPPED}" "${CHECKPOINT:?set CHECKPOINT}" --launcher slurm "$@" ;;
    *) echo "downstream.sh: unknown job $JOB (dist_train, dist_test, slurm_train or slurm_test)" >&2; exit 2 ;;
esac
