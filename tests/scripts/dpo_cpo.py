"""A training script shaped like TRL 1.16's `trl/scripts/dpo.py`, swapped to CPO as the README's swap section shows.

The swap is two names: `CPOConfig` instead of `DPOConfig` in the `TrlParser` dataclasses (so `--cpo_gamma` and a
`cpo_gamma:` YAML key reach the trainer) and `CPOTrainer` instead of `DPOTrainer`. Everything else keeps the shape of
TRL's script: `make_parser`, `main(script_args, training_args, model_args, dataset_args)`, and parsing with
`fail_with_unknown_args=False`. tests/test_swap_script.py runs it.
"""

import argparse


def main(script_args, training_args, model_args, dataset_args):
    from datasets import load_dataset
    from trl import get_dataset, get_peft_config, get_quantization_config

    from trl_cpo import CPOTrainer  # was: from trl import DPOTrainer

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    else:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")

    trainer = CPOTrainer(  # was: DPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from trl_cpo import CPOConfig

    dataclass_types = (ScriptArguments, CPOConfig, ModelConfig, DatasetMixtureConfig)  # was: DPOConfig
    if subparsers is not None:
        parser = subparsers.add_parser("cpo", help="Run the CPO training script", dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types, prog=prog)
    return parser


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args, dataset_args)
