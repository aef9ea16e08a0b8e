"""The TOML configuration: strict schemas, path resolution, cross-checks, printing, and the CLI's error contract."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rwkv_app.config import (
    InferConfig, ModelConfig, TrainConfig, config_names, dump_toml, load_infer_config, load_infer_file,
    load_model_config, load_train_config, load_train_file, parse_infer,
)
from rwkv_app.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config"

MODEL = """
num_cells = 2
vocab_size = 100
embedded_dim = 128
num_heads = 2
"""

TRAIN = """
model_cfg = "tiny"
experiment_name = "exp"
dataset_base_path = "../data"
filename_without_extensions = "corpus"
batch_size_per_device = 2
context_length = 64
"""

INFER = """
[[models]]
model_name = "tiny"
model_cfg = "tiny"
weights_path = "../weights/tiny.safetensors"
"""


def make_config_dir(root: Path, model: str = MODEL, train: str = TRAIN, infer: str = INFER) -> Path:
    cfg = root / "config"
    for kind, body, name in (("model", model, "tiny"), ("train", train, "exp"), ("infer", infer, "srv")):
        (cfg / kind).mkdir(parents=True, exist_ok=True)
        (cfg / kind / f"{name}.toml").write_text(textwrap.dedent(body))
    return cfg


def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ shipped configs


@pytest.mark.parametrize("name", config_names(SHIPPED, "model"))
def test_shipped_model_configs_load(name):
    cfg = load_model_config(SHIPPED, name)
    assert cfg.num_heads * cfg.head_dim == cfg.embedded_dim


@pytest.mark.parametrize("name", config_names(SHIPPED, "train"))
def test_shipped_train_configs_load_and_round_trip(name, tmp_path):
    cfg = load_train_config(SHIPPED, name)
    printed = tmp_path / "printed.toml"
    printed.write_text(dump_toml(cfg))
    assert load_train_file(printed) == cfg


@pytest.mark.parametrize("name", config_names(SHIPPED, "infer"))
def test_shipped_infer_configs_load_and_round_trip(name, tmp_path):
    cfg = load_infer_config(SHIPPED, name)
    printed = tmp_path / "printed.toml"
    printed.write_text(dump_toml(cfg))
    assert load_infer_file(printed) == cfg


def test_shipped_sizes_match_the_spec():
    expected = {"0.1b": (12, 768, 191.0), "0.4b": (24, 1024, 450.8), "1.5b": (24, 2048, 1527.4),
                "2.9b": (32, 2560, 2947.7), "7.2b": (32, 4096, 7199.1)}
    for size, (layers, width, millions) in expected.items():
        cfg = load_model_config(SHIPPED, f"rwkv-lm-{size}")
        assert (cfg.num_cells, cfg.embedded_dim, cfg.head_dim, cfg.vocab_size) == (layers, width, 64, 65536)
        assert cfg.num_parameters / 1e6 == pytest.approx(millions, rel=2e-3)
    assert load_model_config(SHIPPED, "rwkv-lm-0.1b").lora_ranks == (64, 64, 32, 128)
    assert load_model_config(SHIPPED, "rwkv-lm-13.3b").lora_ranks == (192, 192, 128, 384)


# ------------------------------------------------------------------------------------------------ strictness


def test_unknown_key_names_file_key_and_closest_valid_key(tmp_path):
    cfg = make_config_dir(tmp_path, train=TRAIN.replace("context_length", "context_len"))
    message = error_of(load_train_config, cfg, "exp")
    assert "train/exp.toml" in message
    assert "unknown key `context_len`" in message
    assert "did you mean `context_length`?" in message


def test_unknown_key_in_model_and_infer_files(tmp_path):
    cfg = make_config_dir(tmp_path, model=MODEL + "num_cell = 3\n")
    assert "model/tiny.toml" in error_of(load_model_config, cfg, "tiny")
    assert "did you mean `num_cells`?" in error_of(load_model_config, cfg, "tiny")
    cfg = make_config_dir(tmp_path, infer=INFER + "max_batch = 4\n")
    message = error_of(load_infer_config, cfg, "srv")
    assert "infer/srv.toml" in message and "did you mean `max_batch_size`?" in message


def test_unknown_top_level_infer_key(tmp_path):
    cfg = make_config_dir(tmp_path, infer="http_bind = \"127.0.0.1:1\"\n" + INFER)
    assert "did you mean `http_bind_addr`?" in error_of(load_infer_config, cfg, "srv")


@pytest.mark.parametrize("line, expected", [
    ("batch_size_per_device = \"two\"", "batch_size_per_device"),
    ("batch_size_per_device = 0", "greater than or equal to 1"),
    ("learning_rate_start = -1.0", "learning_rate_start"),
    ("strategy = \"deepspeed_stage_9\"", "strategy"),
    ("grad_checkpoint = \"yes\"", "grad_checkpoint"),
    ("experiment_name = \"../escape\"", "plain folder name"),
])
def test_wrong_types_and_ranges_name_the_key(tmp_path, line, expected):
    key = line.split(" = ")[0]
    body = "\n".join(l for l in TRAIN.splitlines() if not l.startswith(key + " ")) + "\n" + line + "\n"
    cfg = make_config_dir(tmp_path, train=body)
    message = error_of(load_train_config, cfg, "exp")
    assert message.startswith("train/exp.toml:")
    assert expected in message


def test_missing_required_key(tmp_path):
    body = "\n".join(l for l in TRAIN.splitlines() if not l.startswith("context_length"))
    cfg = make_config_dir(tmp_path, train=body)
    assert "missing required key `context_length`" in error_of(load_train_config, cfg, "exp")


def test_invalid_toml_is_one_line(tmp_path):
    cfg = make_config_dir(tmp_path, train=TRAIN + "this is = = not toml\n")
    assert "invalid TOML" in error_of(load_train_config, cfg, "exp")


def test_missing_name_lists_the_names_that_exist(tmp_path):
    cfg = make_config_dir(tmp_path)
    (cfg / "train" / "other.toml").write_text(TRAIN)
    message = error_of(load_train_config, cfg, "nope")
    assert "no train config `nope`" in message and "available: exp, other" in message
    assert "without `.toml`" in error_of(load_train_config, cfg, "exp.toml")
    assert "not found" in error_of(load_train_config, tmp_path / "absent", "exp")


def test_missing_model_cfg_lists_models(tmp_path):
    cfg = make_config_dir(tmp_path, train=TRAIN.replace('"tiny"', '"huge"'))
    message = error_of(load_train_config, cfg, "exp")
    assert "no model config `huge`" in message and "available: tiny" in message


# ------------------------------------------------------------------------------------------------ cross-checks


@pytest.mark.parametrize("extra, expected", [
    ("num_heads = 3", "must equal `embedded_dim`"),
    ("channel_mix_dim_scale = 0.001", "whole number"),
    ("with_token_shift = false", "with_token_shift"),
    ("with_deep_embed_att = true", "not supported"),
])
def test_model_cross_checks(tmp_path, extra, expected):
    key = extra.split(" = ")[0]
    body = "\n".join(l for l in MODEL.splitlines() if not l.startswith(key)) + "\n" + extra + "\n"
    cfg = make_config_dir(tmp_path, model=body)
    assert expected in error_of(load_model_config, cfg, "tiny")


def test_infer_cross_checks(tmp_path):
    twice = INFER + INFER
    cfg = make_config_dir(tmp_path, infer=twice)
    assert "must be unique; repeated: tiny" in error_of(load_infer_config, cfg, "srv")
    cfg = make_config_dir(tmp_path, infer=INFER + "max_context_len = 64\nparagraph_len = 128\n")
    assert "`paragraph_len` (128) must not exceed `max_context_len` (64)" in error_of(load_infer_config, cfg, "srv")
    cfg = make_config_dir(tmp_path, infer=INFER + "device_ids = [0, 0]\n")
    assert "repeats an id" in error_of(load_infer_config, cfg, "srv")
    cfg = make_config_dir(tmp_path, infer='http_bind_addr = "localhost"\n' + INFER)
    assert "HOST:PORT" in error_of(load_infer_config, cfg, "srv")


def test_train_cross_checks(tmp_path):
    cfg = make_config_dir(tmp_path, train=TRAIN + "learning_rate_start = 1e-4\nlearning_rate_end = 1e-3\n")
    assert "learning_rate_end" in error_of(load_train_config, cfg, "exp")
    cfg = make_config_dir(tmp_path, train=TRAIN + 'tokenizer = "generic"\n')
    assert "tokenizer_vocab_path" in error_of(load_train_config, cfg, "exp")


# ------------------------------------------------------------------------------------------------ path resolution


def test_paths_resolve_against_the_toml_folder(tmp_path):
    cfg = make_config_dir(tmp_path)
    train = load_train_config(cfg, "exp")
    assert Path(train.dataset_base_path) == (cfg / "data").resolve()
    assert train.dataset_prefix == (cfg / "data" / "corpus").resolve()
    assert train.run_dir == (tmp_path / "runs" / "exp").resolve()
    infer = load_infer_config(cfg, "srv")
    assert Path(infer.models[0].weights_path) == (cfg / "weights" / "tiny.safetensors").resolve()
    assert infer.models[0].arch.embedded_dim == 128


def test_model_cfg_with_slash_is_relative_to_the_referencing_file(tmp_path):
    cfg = make_config_dir(tmp_path, train=TRAIN.replace('"tiny"', '"../shared/arch.toml"'))
    (cfg / "shared").mkdir()
    (cfg / "shared" / "arch.toml").write_text(MODEL.replace("128", "256"))
    train = load_train_config(cfg, "exp")
    assert train.arch.embedded_dim == 256
    assert Path(train.model_cfg) == (cfg / "shared" / "arch.toml").resolve()
    cfg = make_config_dir(tmp_path, train=TRAIN.replace('"tiny"', '"../shared/none.toml"'))
    assert "model config `../shared/none.toml` not found" in error_of(load_train_config, cfg, "exp")


def test_inline_model_table_and_conflict(tmp_path):
    inline = TRAIN.replace('model_cfg = "tiny"\n', "") + "[model]\n" + MODEL
    cfg = make_config_dir(tmp_path, train=inline)
    assert load_train_config(cfg, "exp").arch.num_cells == 2
    cfg = make_config_dir(tmp_path, train=TRAIN + "[model]\n" + MODEL.replace("num_cells = 2", "num_cells = 3"))
    assert load_train_config(cfg, "exp").arch.num_cells == 3, "the inline table wins over model_cfg"


def test_errors_inside_a_referenced_model_name_that_file(tmp_path):
    cfg = make_config_dir(tmp_path, model=MODEL + "dropout = 0.1\n")
    message = error_of(load_train_config, cfg, "exp")
    assert message.startswith("model/tiny.toml:") and "did you mean `dropout_prob`?" in message


# ------------------------------------------------------------------------------------------------ rwkv-rs names


RWKV_RS_MODEL = """
model_type = "auto_regressive"
num_cells = 12
vocab_size = 65536
embedded_dim = 768
num_heads = 12
channel_mix_dim_scale = 4
dropout_prob = 0.01
with_token_shift = true
with_deep_embed_att = false
with_deep_embed_ffn = false
"""

RWKV_RS_TRAIN = """
model_cfg = "tiny"
experiment_name = "your_experiment_name"
dataset_base_path = "/mnt/d/your/dataset/dir"
filename_without_extensions = "your_dataset_filename"
dataset_format = "rwkv_legacy"
random_seed = 42
num_nodes = 1
num_devices_per_node = 1
batch_size_per_device = 16
num_dataset_repeats = 1
context_length = 512
optimizer = "adam_w"
learning_rate_start = 6e-4
learning_rate_end = 6e-5
warmup_steps = 0
weight_decay = 0.001
gradient_clip_val = 1.0
grad_checkpoint = true
level = "warn"
use_tui = false
upload_to_wandb = true
wandb_api_key = "your_api_key"
wandb_entity_name = "your_entity_name"
wandb_project_name = "your_project_name"
"""

RWKV_RS_INFER = """
http_bind_addr = "0.0.0.0:8080"
request_body_limit_bytes = 52428800
sse_keep_alive_ms = 10000

[[models]]
model_name = "rwkv-lm-7.2b"
model_cfg = "tiny"
weights_path = "../../weights/rwkv7-g1d-7.2b-20260131-ctx8192.pth"
tokenizer_vocab_path = "../../assets/rwkv_vocab_v20230424.txt"
device_type = 0
device_ids = [0]
max_batch_size = 4
max_context_len = 4096
paragraph_len = 256
decode_first = true
"""


def test_rwkv_rs_field_names_load(tmp_path):
    cfg = make_config_dir(tmp_path, model=RWKV_RS_MODEL, train=RWKV_RS_TRAIN, infer=RWKV_RS_INFER)
    model = load_model_config(cfg, "tiny")
    assert (model.n_layer, model.n_embd, model.head_dim, model.ffn_dim) == (12, 768, 64, 3072)
    train = load_train_config(cfg, "exp")
    assert train.batch_size_per_device == 16 and train.grad_checkpoint and train.wandb_api_key == "your_api_key"
    infer = load_infer_config(cfg, "srv")
    entry = infer.models[0]
    assert (infer.host, infer.port, entry.device_type, entry.decode_first) == ("0.0.0.0", 8080, "auto", True)


# ------------------------------------------------------------------------------------------------ printing


def test_round_trip_load_print_load_keeps_everything_but_secrets(tmp_path):
    cfg = make_config_dir(tmp_path, model=RWKV_RS_MODEL, train=RWKV_RS_TRAIN,
                          infer='api_key = "sk-secret"\nadmin_api_key = "adm"\n' + RWKV_RS_INFER)
    train = load_train_config(cfg, "exp")
    printed = dump_toml(train)
    assert "your_api_key" not in printed and "secrets not shown: wandb_api_key" in printed
    (tmp_path / "t.toml").write_text(printed)
    assert load_train_file(tmp_path / "t.toml") == train.model_copy(update={"wandb_api_key": None})

    infer = load_infer_config(cfg, "srv")
    printed = dump_toml(infer)
    assert "sk-secret" not in printed and "adm" not in printed.replace("admin", "")
    (tmp_path / "i.toml").write_text(printed)
    again = load_infer_file(tmp_path / "i.toml")
    assert again == infer.model_copy(update={"api_key": None, "admin_api_key": None})
    assert "sk-secret" in dump_toml(infer, keep_secrets=True)


def test_parse_infer_validates_a_dict_as_if_it_were_the_file(tmp_path):
    cfg = make_config_dir(tmp_path)
    path = cfg / "infer" / "srv.toml"
    parsed = parse_infer({"models": [{"model_name": "x", "model_cfg": "tiny", "weights_path": "w.pth"}]}, path, cfg)
    assert isinstance(parsed, InferConfig) and Path(parsed.models[0].weights_path) == (cfg / "infer" / "w.pth")
    with pytest.raises(UserError, match="models.0.max_batch_size"):
        parse_infer({"models": [{"model_name": "x", "model_cfg": "tiny", "weights_path": "w", "max_batch_size": 0}]},
                    path, cfg)


def test_schemas_document_every_field():
    for cls in (ModelConfig, TrainConfig, InferConfig):
        for name, field in cls.model_fields.items():
            assert field.description or name.startswith(("adam_", "wandb_")), f"{cls.__name__}.{name} undocumented"


def test_config_reference_doc_is_current():
    from rwkv_app.config import render_reference
    assert (REPO / "docs" / "config.md").read_text() == render_reference(), \
        "docs/config.md is stale: run `python -m rwkv_app.config > docs/config.md`"


# ------------------------------------------------------------------------------------------------ command lines


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    code = "import sys; from rwkv_app.cli.{0} import main; sys.exit(main(sys.argv[1:]))".format(args[0])
    return subprocess.run([sys.executable, "-c", code, *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("cli, flag", [("train", "--train-cfg"), ("infer", "--infer-cfg")])
def test_cli_errors_are_one_line_exit_2(tmp_path, cli, flag):
    cfg = make_config_dir(tmp_path, train=TRAIN.replace("context_length", "context_len"),
                          infer=INFER.replace("max_batch_size", "x") + "max_batch = 2\n")
    name = "exp" if cli == "train" else "srv"
    result = run_cli(cli, "--config-dir", str(cfg), flag, name, "--print-config")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "unknown key" in result.stderr
    missing = run_cli(cli, "--config-dir", str(cfg), flag, "nope")
    assert missing.returncode == 2 and "available:" in missing.stderr and "Traceback" not in missing.stderr
    no_flag = run_cli(cli, "--config-dir", str(cfg))
    assert no_flag.returncode == 2 and "Traceback" not in no_flag.stderr


def test_cli_help_lists_the_flags():
    for cli in ("train", "infer", "data"):
        result = run_cli(cli, "--help")
        assert result.returncode == 0 and "--config-dir" in result.stdout or "prepare" in result.stdout


@pytest.mark.parametrize("cli, flag, name", [("train", "--train-cfg", "rwkv-lm-0.1b"),
                                             ("infer", "--infer-cfg", "rwkv-lm-7.2b")])
def test_print_config_of_the_shipped_recipes(tmp_path, cli, flag, name):
    if name not in config_names(SHIPPED, cli):
        pytest.skip(f"config/{cli}/{name}.toml not written yet")
    result = run_cli(cli, "--config-dir", "config", flag, name, "--print-config")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "printed.toml"
    out.write_text(result.stdout)
    loader = load_train_file if cli == "train" else load_infer_file
    again = loader(out)
    assert again == (load_train_config if cli == "train" else load_infer_config)(SHIPPED, name).model_copy(
        update={k: None for k in ("api_key", "admin_api_key", "wandb_api_key") if k in type(again).model_fields})


def test_loaded_configs_know_their_file_for_error_messages(tmp_path):
    cfg = make_config_dir(tmp_path)
    assert load_train_config(cfg, "exp").source == "train/exp.toml"
    assert load_infer_config(cfg, "srv").source == "infer/srv.toml"
