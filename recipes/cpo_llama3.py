# Copyright the trl-cpo authors. Licensed under the Apache License, Version 2.0.
"""
Train Llama-3 with CPO or E-CPOC (Constrained Preference Optimization, arXiv:2605.20834), or the matching DPO
baseline: the entry point the recipes launch. It runs the package's train script, `trl_cpo.scripts.train` (the same
as `trl-cpo train`); `--help` lists every option, and `--config FILE.yaml` sets them from a file.

Full fine-tuning of Llama-3-8B-Instruct with the released settings (8 GPUs, DeepSpeed ZeRO-3):

    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml \\
        recipes/cpo_llama3.py --config recipes/configs/cpo_llama3_8b_instruct_full.yaml

The DPO baseline on the same settings (`--method dpo`; `--method ecpoc` for E-CPOC):

    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml \\
        recipes/cpo_llama3.py --config recipes/configs/cpo_llama3_8b_instruct_full.yaml --method dpo \\
        --output_dir outputs/llama3-8b-instruct-dpo

QLoRA on one GPU:

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/cpo_llama3.py --config recipes/configs/cpo_llama3_8b_instruct_qlora.yaml

Offline smoke run on CPU (tiny model built locally, data shipped in recipes/data):

    python recipes/make_tiny_model.py outputs/tiny-llama
    accelerate launch --num_processes 1 --cpu recipes/cpo_llama3.py --config recipes/configs/tiny_cpu.yaml
    torchrun --nproc_per_node 2 recipes/cpo_llama3.py --config recipes/configs/tiny_cpu.yaml   # 2 CPU processes

See recipes/README.md for the table of setups.
"""

from trl_cpo.scripts.train import main

if __name__ == "__main__":
    main()  # returns 0 or raises
