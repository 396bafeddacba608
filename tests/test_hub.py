"""Hub push of CPO / E-CPOC runs, tested up to huggingface_hub's network boundary (no Hub is reachable here).

`Trainer.push_to_hub` (transformers 5.x) calls `HfApi.create_repo` (via `init_hf_repo`) and `HfApi.upload_folder`,
and `upload_folder` picks the files (ignore patterns included), validates the card's YAML with a POST and uploads
them with `HfApi.create_commit` (or hf_xet's pipelined upload when installed). The fake Hub below replaces only the
three network calls (`create_repo`, `_validate_yaml`, `create_commit`) and forces the single-commit path, so
everything up to the HTTP requests is the real code, and the test sees the exact files and bytes that would be
committed. Not exercised: authentication, the HTTP upload itself (LFS / xet), the Hub's own YAML validation (checked
locally with `huggingface_hub.ModelCard` instead) and the rendering of the card on the Hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO, cpu_args, load_script
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


class FakeHub:
    def __init__(self):
        self.repos: list[dict] = []
        self.commits: list[dict] = []
        self.validated: list[dict] = []

    def install(self, monkeypatch):
        import huggingface_hub.hf_api as hf_api_module

        hub = self

        def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
            full_id = repo_id if "/" in repo_id else f"test-user/{repo_id}"
            hub.repos.append({"repo_id": full_id, "private": private, "exist_ok": exist_ok})
            return RepoUrl(f"{self.endpoint}/{full_id}", endpoint=self.endpoint)

        def validate_yaml(self, content, *, repo_type=None, token=None):
            hub.validated.append(ModelCard(content).data.to_dict())  # raises on invalid metadata

        def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
            files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
            hub.commits.append({"repo_id": repo_id, "message": commit_message, "files": files, **kwargs})
            return CommitInfo(
                commit_url=f"{self.endpoint}/{repo_id}/commit/{'0' * 40}",
                commit_message=commit_message,
                commit_description="",
                oid="0" * 40,
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(hf_api_module, "is_xet_available", lambda: False)
        return self


@pytest.fixture
def fake_hub(monkeypatch):
    return FakeHub().install(monkeypatch)


def check_card(text: str, *, method: str, base_model: str, dataset: str, rows: dict[str, object]):
    """The card names the method (not TRL's Contrastive PO), the paper, the base model, the data and the settings."""
    card = ModelCard(text)
    assert card.data.to_dict()["datasets"] == dataset
    assert "trl-cpo" in card.data.tags
    heading = {"CPO": "## Method: CPO (Constrained Preference Optimization)", "E-CPOC": "## Method: E-CPOC"}[method]
    assert heading in text
    assert "arXiv:2605.20834" in text and "https://arxiv.org/abs/2605.20834" in text
    assert "not TRL's Contrastive Preference Optimization" in text
    assert text.count("Contrastive Preference Optimization") == 1  # only in the disambiguation note
    assert f"- Base model: {base_model}" in text
    assert f"- Dataset: {dataset}" in text
    for name, value in rows.items():
        assert f"| `{name}` | `{value}` |" in text, name
    assert "length_normalize" not in text


def config_kwargs(tmp_path, **kwargs):
    return cpu_args(tmp_path / "run", max_steps=2, disable_tqdm=True, **kwargs)


def test_push_lora_adapter_with_cpo_card(fake_hub, model_dir, train_dataset, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # As if the base had been loaded from the Hub: TRL only names a base model in the metadata when it is a repo id.
    model.config._name_or_path = "example-org/tiny-llama-base"
    args = CPOConfig(
        **config_kwargs(tmp_path, push_to_hub=True, hub_model_id="tiny-cpo-lora", save_strategy="steps", save_steps=1)
    )
    trainer = CPOTrainer(
        model,
        args=args,
        train_dataset=train_dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    trainer.push_to_hub(dataset_name="trl-lib/ultrafeedback_binarized")

    assert fake_hub.repos == [{"repo_id": "test-user/tiny-cpo-lora", "private": None, "exist_ok": True}]
    messages = [c["message"] for c in fake_hub.commits]
    assert messages == ["Training in progress, step 1", "Training in progress, step 2", "End of training"]
    expected = {"README.md", "adapter_config.json", "adapter_model.safetensors", "training_args.bin", *TOKENIZER_FILES}
    for commit in fake_hub.commits:
        assert commit["repo_id"] == "test-user/tiny-cpo-lora"
        assert set(commit["files"]) == expected  # no full weights, no checkpoint-* folders
    final = fake_hub.commits[-1]["files"]
    assert final["adapter_model.safetensors"] == (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    assert fake_hub.validated[-1]["base_model"] == "example-org/tiny-llama-base"
    check_card(
        final["README.md"].decode(),
        method="CPO",
        base_model="example-org/tiny-llama-base",
        dataset="trl-lib/ultrafeedback_binarized",
        rows={"beta": 2.5, "cpo_gamma": 0.05, "cpo_margin_type": "inverse_prob", "loss_type": ["sigmoid_norm"]},
    )


def test_push_full_weights_with_ecpoc_card(fake_hub, model_dir, train_dataset, tmp_path):
    args = ECPOCConfig(
        **config_kwargs(tmp_path, push_to_hub=True, hub_model_id="test-org/tiny-ecpoc", save_strategy="no"),
        ecpoc_gamma=0.5,
        ecpoc_tau=2.0,
        ecpoc_alpha=1.0,
    )
    trainer = ECPOCTrainer(model_dir, args=args, train_dataset=train_dataset)
    trainer.train()
    trainer.push_to_hub(dataset_name="HuggingFaceH4/ultrafeedback_binarized")

    assert [r["repo_id"] for r in fake_hub.repos] == ["test-org/tiny-ecpoc"]
    (commit,) = fake_hub.commits
    assert set(commit["files"]) == {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "training_args.bin",
        *TOKENIZER_FILES,
    }
    check_card(
        commit["files"]["README.md"].decode(),
        method="E-CPOC",
        base_model=model_dir,
        dataset="HuggingFaceH4/ultrafeedback_binarized",
        rows={"beta": 2.5, "ecpoc_gamma": 0.5, "ecpoc_tau": 2.0, "ecpoc_alpha": 1.0, "loss_type": ["sigmoid_norm"]},
    )


def test_recipe_push_to_hub_qlora(fake_hub, tmp_path, monkeypatch):
    """`recipes/cpo_llama3.py --push_to_hub` with QLoRA (4-bit NF4 + LoRA) uploads the adapter and a card naming
    the dataset: one commit, after training, from the recipe's own code path."""
    pytest.importorskip("bitsandbytes")
    recipe = load_script("cpo_llama3_recipe", REPO / "recipes" / "cpo_llama3.py")
    make_tiny_model = load_script("make_tiny_model", REPO / "recipes" / "make_tiny_model.py")
    model_dir = make_tiny_model.build(tmp_path / "tiny-llama")
    monkeypatch.chdir(REPO)  # the config's dataset path is relative to the repo root
    argv = ["--config", "recipes/configs/tiny_cpu.yaml", "--model_name_or_path", str(model_dir)]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--disable_tqdm", "true"]
    argv += ["--use_peft", "--load_in_4bit", "--lora_r", "8", "--lora_target_modules", "all-linear"]
    argv += ["--push_to_hub", "--hub_model_id", "test-org/tiny-cpo-qlora", "--cpo_gamma", "0.1"]
    trainer = recipe.main(*recipe.parse_args(argv))
    assert trainer.model.get_base_model().is_loaded_in_4bit

    assert [r["repo_id"] for r in fake_hub.repos] == ["test-org/tiny-cpo-qlora"]
    (commit,) = fake_hub.commits
    assert commit["message"] == "End of training"
    assert set(commit["files"]) == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_args.bin",
        "all_results.json",
        "train_results.json",
        "trainer_state.json",
        "chat_template.jinja",  # make_tiny_model.py gives the tiny tokenizer a chat template
        *TOKENIZER_FILES,
    }
    check_card(
        commit["files"]["README.md"].decode(),
        method="CPO",
        base_model=str(model_dir),
        dataset="tiny_prefs.jsonl",
        rows={"beta": 2.5, "cpo_gamma": 0.1, "cpo_margin_type": "inverse_prob", "loss_type": ["sigmoid_norm"]},
    )
