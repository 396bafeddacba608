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

import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO, cpu_args, load_script
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_cpo
from trl_cpo import CPOConfig, CPOTrainer, ECPOCConfig, ECPOCTrainer
from trl_cpo.model_card import (
    HUB_DRY_RUN_DIR,
    base_model_license,
    hub_repo_id,
    resolve_base_model,
    resolve_datasets,
)
from trl_cpo.scripts import train as train_script

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


def check_card(text: str, *, method: str, base_model: str | None, datasets: list[str], rows: dict[str, object]):
    """The card names the method (not TRL's Contrastive PO), the paper, the base model, the data and the settings;
    Hub ids (and only they) are in the metadata and linked."""
    card = ModelCard(text)
    metadata = card.data.to_dict()
    hub_datasets = [d for d in datasets if not d.startswith("local:")]
    assert metadata.get("datasets") == (hub_datasets or None)
    assert metadata.get("base_model") == base_model
    assert "trl-cpo" in card.data.tags
    assert "licence" not in metadata  # TRL's own card writes a bogus `licence: license`
    heading = {"CPO": "### Method: CPO (Constrained Preference Optimization)", "E-CPOC": "### Method: E-CPOC"}[method]
    assert heading in text and "## Training procedure" in text
    assert "arXiv:2605.20834" in text and "https://arxiv.org/abs/2605.20834" in text
    assert "not TRL's Contrastive Preference Optimization" in text
    assert text.count("Contrastive Preference Optimization") == 1  # only in the disambiguation note
    assert "huggingface.co/None" not in text and "[None]" not in text
    if base_model is None:
        assert "- Base model: a model loaded from the local folder `" in text
    else:
        assert f"- Base model: [{base_model}](https://huggingface.co/{base_model})" in text
    for name in datasets:
        if name.startswith("local:"):
            assert f"the local dataset `{name[len('local:') :]}`" in text
            assert f"huggingface.co/datasets/{name[len('local:') :]}" not in text
        else:
            assert f"[{name}](https://huggingface.co/datasets/{name})" in text
    for name, value in rows.items():
        assert f"| `{name}` | `{value}` |" in text, name
    assert "Reference report (train set, before the first step)" in text
    assert "`u_fraction`" in text and "at the first logged step (1)" in text
    assert f"- trl-cpo: {trl_cpo.__version__}" in text
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
        datasets=["trl-lib/ultrafeedback_binarized"],
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
        base_model=None,  # loaded from a local folder, no base_model_id: named as local, not linked
        datasets=["HuggingFaceH4/ultrafeedback_binarized"],
        rows={"beta": 2.5, "ecpoc_gamma": 0.5, "ecpoc_tau": 2.0, "ecpoc_alpha": 1.0, "loss_type": ["sigmoid_norm"]},
    )


def train_script_argv(model_dir, out, *extra):
    argv = ["--config", "recipes/configs/tiny_cpu.yaml", "--model_name_or_path", str(model_dir)]
    argv += ["--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true"]
    return [*argv, *extra]


@pytest.fixture(scope="module")
def recipe_model(tmp_path_factory):
    make_tiny_model = load_script("make_tiny_model", REPO / "recipes" / "make_tiny_model.py")
    return make_tiny_model.build(tmp_path_factory.mktemp("hub") / "tiny-llama")


def test_recipe_push_to_hub_qlora(fake_hub, recipe_model, tmp_path, monkeypatch):
    """`trl-cpo train --push_to_hub` with QLoRA (4-bit NF4 + LoRA) uploads the adapter and a card naming the base
    model the user names and the license, at each checkpoint (hub_strategy every_save) and after training."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(REPO)  # the config's dataset path is relative to the repo root
    argv = train_script_argv(recipe_model, tmp_path / "out", "--save_strategy", "steps", "--save_steps", "1")
    argv += ["--use_peft", "--load_in_4bit", "--lora_r", "8", "--lora_target_modules", "all-linear"]
    argv += ["--push_to_hub", "--hub_model_id", "test-org/tiny-cpo-qlora", "--cpo_gamma", "0.1"]
    argv += ["--base_model_id", "example-org/tiny-llama-base", "--model_card_license", "apache-2.0"]
    trainer = train_script.train(*train_script.parse_args(argv))
    assert trainer.model.get_base_model().is_loaded_in_4bit

    assert [r["repo_id"] for r in fake_hub.repos] == ["test-org/tiny-cpo-qlora"]
    messages = [c["message"] for c in fake_hub.commits]
    assert messages == ["Training in progress, step 1", "Training in progress, step 2", "End of training"]
    for checkpoint_commit in fake_hub.commits[:-1]:  # the checkpoint cards carry the same metadata
        metadata = ModelCard(checkpoint_commit["files"]["README.md"].decode()).data.to_dict()
        assert metadata["base_model"] == "example-org/tiny-llama-base" and metadata["license"] == "apache-2.0"
    commit = fake_hub.commits[-1]
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
    text = commit["files"]["README.md"].decode()
    check_card(
        text,
        method="CPO",
        base_model="example-org/tiny-llama-base",
        datasets=["local:tiny_prefs.jsonl"],  # a local file: named, not linked, not in the metadata
        rows={"beta": 2.5, "cpo_gamma": 0.1, "cpo_margin_type": "inverse_prob", "loss_type": ["sigmoid_norm"]},
    )
    metadata = ModelCard(text).data.to_dict()
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "peft"
    assert fake_hub.validated[-1]["base_model"] == "example-org/tiny-llama-base"


def test_hub_dry_run_writes_what_a_push_uploads(recipe_model, tmp_path, monkeypatch):
    """`--push_to_hub --hub_dry_run true` writes the folder a push would upload, offline, and calls no Hub API; a real
    push of the same run (through the fake Hub) commits the same files, byte for byte where the run is deterministic."""
    monkeypatch.chdir(REPO)
    base = shutil.copytree(recipe_model, tmp_path / "base")  # a local base whose own card names its license
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny base\n")
    out, kept = tmp_path / "out", tmp_path / "dry"
    argv = train_script_argv(base, out, "--push_to_hub", "--hub_model_id", "test-org/tiny-cpo")
    argv += ["--model_card_dataset_name", "HuggingFaceH4/ultrafeedback_binarized"]

    # Dry run: every Hub API call fails (as it would offline), so a push attempt would fail the run.
    def no_network(self, *args, **kwargs):
        raise AssertionError("the dry run called the Hub")

    with monkeypatch.context() as m:
        for name in ("create_repo", "upload_folder", "create_commit", "whoami"):
            m.setattr(HfApi, name, no_network)
        train_script.train(*train_script.parse_args([*argv, "--hub_dry_run", "true"]))
    dry = out / HUB_DRY_RUN_DIR
    dry_files = {p.relative_to(dry).as_posix(): p.read_bytes() for p in dry.rglob("*") if p.is_file()}
    dry.rename(kept)
    for path in out.iterdir():  # a clean output_dir for the real run
        path.unlink() if path.is_file() else shutil.rmtree(path)

    hub = FakeHub().install(monkeypatch)
    train_script.train(*train_script.parse_args(argv))
    (commit,) = hub.commits
    pushed = commit["files"]
    assert set(dry_files) == set(pushed)
    assert {"README.md", "model.safetensors", "config.json", "training_args.bin"} <= set(dry_files)
    assert not any(name.startswith(("_", "checkpoint-")) for name in dry_files)
    # Timings differ between two runs; everything else is the same bytes.
    timed = {"all_results.json", "train_results.json", "trainer_state.json"}
    for name in set(dry_files) - timed:
        assert dry_files[name] == pushed[name], name
    for name in timed:
        assert _untimed(dry_files[name]) == _untimed(pushed[name]), name
    check_card(
        dry_files["README.md"].decode(),
        method="CPO",
        base_model=None,
        datasets=["HuggingFaceH4/ultrafeedback_binarized"],
        rows={"beta": 2.5, "cpo_gamma": 0.05, "num_processes": 1, "optimizer steps": 2},
    )
    assert 'model="test-org/tiny-cpo"' in dry_files["README.md"].decode()
    assert ModelCard(dry_files["README.md"].decode()).data.license == "mit"  # from the base model's card


def _untimed(raw: bytes):
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "runtime" not in k and "per_second" not in k}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(raw))


def test_hub_dry_run_needs_push_to_hub(recipe_model, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match="hub_dry_run=True .* set push_to_hub=True"):
        train_script.parse_args(train_script_argv(recipe_model, tmp_path / "out", "--hub_dry_run", "true"))


def test_card_names_hub_ids_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prefs.jsonl").write_text("{}")
    assert hub_repo_id("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert hub_repo_id("prefs.jsonl") is None  # a valid repo-id spelling, but a local file here
    assert hub_repo_id("/data/prefs.jsonl") is None and hub_repo_id("./x") is None and hub_repo_id(None) is None
    ids, shown = resolve_datasets(["org/prefs", "prefs.jsonl", str(tmp_path / "prefs.jsonl")])
    assert ids == ["org/prefs"]
    assert shown == [
        "[org/prefs](https://huggingface.co/datasets/org/prefs)",
        "the local dataset `prefs.jsonl`",
        "the local dataset `prefs.jsonl`",
    ]
    assert resolve_base_model("org/base", None) == ("org/base", "[org/base](https://huggingface.co/org/base)")
    assert resolve_base_model(str(tmp_path), "org/base")[0] == "org/base"
    local = resolve_base_model(str(tmp_path), None)
    assert local[0] is None and f"local folder `{tmp_path.name}`" in local[1] and "](" not in local[1]
    with pytest.raises(ValueError, match="base_model_id='/models/llama' is not a Hub model id"):
        resolve_base_model("/models/llama", "/models/llama")


def test_license_comes_from_the_base_models_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    assert base_model_license(str(base), None) is None
    (base / "README.md").write_text("---\nlicense: llama3\n---\n# A base model\n")
    assert base_model_license(str(base), None) == "llama3"
