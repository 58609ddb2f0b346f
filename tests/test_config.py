"""Config tree: YAML round trip, overrides, and one clear error per problem naming the key and its source."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rarl_fast.config import Config, ConfigError
from rarl_fast.config_loader import config_from_dict, config_to_dict, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def _every_field_documented(cls) -> list[str]:
    """Names of fields without a docstring (the attribute docstring right after the field)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    missing = []
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            nxt = body[i + 1] if i + 1 < len(body) else None
            is_doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
            if not is_doc:
                missing.append(node.target.id)
    return missing


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"demo_cpu.yaml", "utkface_3b.yaml", "cocorem_3b.yaml", "ava_3b.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_round_trip_yaml_dataclasses_yaml(path: Path, tmp_path: Path):
    cfg = load_config(path)
    text = dump_config(cfg)
    again = load_config(_write(tmp_path, text))
    assert again == cfg
    assert dump_config(again) == text


def test_defaults_round_trip_and_method_defaults():
    cfg = Config()
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    # docs/method.md defaults
    assert cfg.reward.lam == 0.2 and cfg.reward.alpha == 0.5 and cfg.reward.beta == 0.5
    assert cfg.reward.weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert cfg.loss.beta_kl == 0.04 and cfg.loss.eps_low == 0.2 and cfg.loss.eps_high == 0.2
    assert cfg.loss.loss_type == "bnpo" and cfg.loss.scale_by_std and not cfg.loss.std_unbiased
    assert cfg.rollout.num_generations == 8 and cfg.rollout.temperature == 1.0
    assert (cfg.rmo.mode, cfg.rmo.source, cfg.rmo.sigma_min, cfg.rmo.p_mut, cfg.rmo.k_mut) == (
        "stagnant",
        "gt",
        1e-3,
        0.5,
        1,
    )
    assert (cfg.model.min_pixels, cfg.model.max_pixels) == (56 * 56, 448 * 448)
    assert cfg.stage_reward_weights(cfg.stage1) == (1.0, 0.0) and not cfg.stage1.rmo
    assert cfg.stage_reward_weights(cfg.stage2) == (0.5, 0.5) and cfg.stage2.rmo
    assert set(cfg.stage2.group_mix) == {1, 2, 4, 8}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_paper_configs_keep_method_defaults(path: Path):
    cfg = load_config(path)
    assert cfg.reward.lam == 0.2 and cfg.loss.beta_kl == 0.04
    assert cfg.loss.eps_low == cfg.loss.eps_high == 0.2
    assert cfg.stage_reward_weights(cfg.stage1) == (1.0, 0.0)
    assert cfg.stage_reward_weights(cfg.stage2) == (0.5, 0.5)


def test_every_field_has_a_docstring():
    classes = [Config]
    seen = []
    while classes:
        cls = classes.pop()
        seen.append(cls)
        assert _every_field_documented(cls) == [], cls.__name__
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default) and type(default) not in seen:
                classes.append(type(default))
    assert len(seen) >= 12


def test_overrides_typed_and_nested(tmp_path: Path):
    path = ROOT / "configs" / "demo_cpu.yaml"
    cfg = load_config(
        path,
        [
            "loss.beta_kl=0.1",
            "rollout.num_generations=6",
            "model.lora.enabled=true",
            "stage2.group_mix={1: 0.5, 8: 0.5}",
            "data.group_sizes=[1, 8]",
            "sft.group_mix={1: 1.0}",
            "reward.tolerance=1e-1",  # YAML reads 1e-1 as a string; float fields accept it
            "run_name=my run",
        ],
    )
    assert cfg.loss.beta_kl == 0.1 and cfg.rollout.num_generations == 6 and cfg.model.lora.enabled
    assert cfg.stage2.group_mix == {1: 0.5, 8: 0.5} and cfg.data.group_sizes == [1, 8]
    assert cfg.reward.tolerance == 0.1 and cfg.run_name == "my run"
    assert load_config(path, ["rollout.top_k=5"]).rollout.top_k == 5


def test_config_to_dict_is_plain():
    d = config_to_dict(Config())
    assert isinstance(d["reward"]["weights"], list) and isinstance(d["stage2"]["group_mix"], dict)
    yaml.safe_dump(d)  # only plain types


def _error(tmp_path: Path, text: str = "", overrides: tuple[str, ...] = ()) -> ConfigError:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value


def test_unknown_key_names_key_and_file(tmp_path: Path):
    err = _error(tmp_path, "loss:\n  beta_kll: 0.1\n")
    assert err.key == "loss.beta_kll"
    assert "unknown key" in str(err) and "beta_kl" in str(err) and str(tmp_path / "cfg.yaml") in str(err)
    err = _error(tmp_path, "lossy: {}\n")
    assert err.key == "lossy" and "unknown key" in str(err)


def test_unknown_key_from_override_names_the_override(tmp_path: Path):
    err = _error(tmp_path, "", ("reward.lamda=0.3",))
    assert err.key == "reward.lamda" and "reward.lamda=0.3" in str(err) and "command-line override" in str(err)


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("loss:\n  beta_kl: high\n", "loss.beta_kl", "expected a number"),
        ("rollout:\n  num_generations: 2.5\n", "rollout.num_generations", "expected an integer"),
        ("rollout:\n  num_generations: true\n", "rollout.num_generations", "expected an integer"),
        ("model:\n  use_liger: 1\n", "model.use_liger", "expected true/false"),
        ("loss:\n  loss_type: ppo\n", "loss.loss_type", "must be one of"),
        ("data:\n  group_sizes: 4\n", "data.group_sizes", "expected a list"),
        ("reward:\n  weights: [0.5, 0.5]\n", "reward.weights", "expected 3 items"),
        ("model: tiny\n", "model", "expected a mapping"),
        ("stage2:\n  group_mix: {one: 1.0}\n", "stage2.group_mix", "expected an integer"),
    ],
)
def test_wrong_type(tmp_path: Path, text: str, key: str, words: str):
    err = _error(tmp_path, text)
    assert err.key.startswith(key) and words in str(err) and "cfg.yaml" in str(err)


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("reward:\n  lam: 1.5\n", "reward.lam", "[0, 1]"),
        ("reward:\n  lam: -0.1\n", "reward.lam", "[0, 1]"),
        ("reward:\n  alpha: -0.5\n", "reward.alpha", ">= 0"),
        ("reward:\n  alpha: 0.7\n  beta: 0.5\n", "reward.beta", "alpha + beta must be <= 1"),
        ("reward:\n  weights: [0.5, 0.5, 0.5]\n", "reward.weights", "sum to <= 1"),
        ("reward:\n  weights: [1.2, -0.1, -0.1]\n", "reward.weights", ">= 0"),
        ("stage1:\n  alpha: 0.9\n  beta: 0.3\n", "stage1.beta", "alpha + beta must be <= 1"),
        ("stage2:\n  alpha: 0.9\n", "stage2.beta", "alpha + beta must be <= 1"),
        ("loss:\n  eps_low: -0.1\n", "loss.eps_low", ">= 0"),
        ("loss:\n  eps_high: -0.2\n", "loss.eps_high", ">= 0"),
        ("loss:\n  loss_type: sapo\n  importance_sampling_level: sequence\n", "loss.importance_sampling_level",
         "must be 'token'"),
        ("loss:\n  delta: 0\n", "loss.delta", "> 0"),
        ("loss:\n  sapo_temperature_neg: -1\n", "loss.sapo_temperature_neg", "> 0"),
        ("rollout:\n  num_generations: 1\n", "rollout.num_generations", "group size of 1"),
        ("rollout:\n  temperature: 0\n", "rollout.temperature", "> 0"),
        ("rollout:\n  top_p: 1.5\n", "rollout.top_p", "(0, 1]"),
        ("rmo:\n  p_mut: 2\n", "rmo.p_mut", "[0, 1]"),
        ("rmo:\n  k_mut: 9\n", "rmo.k_mut", "< rollout.num_generations"),
        ("rmo:\n  k_mut: 8\n", "rmo.k_mut", "< rollout.num_generations"),
        ("data:\n  group_sizes: [1, 16]\n", "data.group_sizes", "1..8"),
        ("stage2:\n  group_mix: {3: 1.0}\n", "stage2.group_mix", "not in data.group_sizes"),
        ("data:\n  task: age\n", "data.root", "required"),
        ("data:\n  task: jsonl\n  root: m.jsonl\n", "data.rule", "required"),
        ("model:\n  min_pixels: 100\n", "model.min_pixels", ">= 784"),
        ("model:\n  min_pixels: 40000\n  max_pixels: 30000\n", "model.max_pixels", ">= min_pixels"),
    ],
)
def test_impossible_values(tmp_path: Path, text: str, key: str, words: str):
    err = _error(tmp_path, text)
    assert err.key == key, str(err)
    assert words in str(err) and "cfg.yaml" in str(err)


def test_group_size_one_is_fine_without_std_scaling(tmp_path: Path):
    text = "rollout:\n  num_generations: 1\nloss:\n  scale_by_std: false\nstage2:\n  rmo: false\n"
    cfg = load_config(_write(tmp_path, text))
    assert cfg.rollout.num_generations == 1


def test_impossible_value_from_override_names_the_override(tmp_path: Path):
    err = _error(tmp_path, "loss:\n  eps_low: 0.1\n", ("loss.eps_low=-1",))
    assert err.key == "loss.eps_low" and "'loss.eps_low=-1'" in str(err)


def test_bad_file_and_bad_override_syntax(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    assert "top level must be a mapping" in str(_error(tmp_path, "- 1\n- 2\n"))
    assert "not valid YAML" in str(_error(tmp_path, "loss: [\n"))
    assert "key.sub=value" in str(_error(tmp_path, "", ("loss.beta_kl",)))
    assert "is a value, not a section" in str(_error(tmp_path, "", ("run_name=x", "run_name.sub=1")))


def test_task_defaults_resolve():
    cfg = load_config(None, ["data.task=age", "data.root=/data/UTKFace"])
    assert cfg.tolerance() == 10.0 and cfg.data.resolved("rule") == "age"
    cfg = load_config(None, ["data.task=count", "data.root=/c", "reward.tolerance=3"])
    assert cfg.tolerance() == 3.0
    assert load_config(None, ["data.task=aesthetics", "data.root=/a"]).tolerance() == 1.0


def test_synthetic_tasks_carry_their_own_defaults():
    cfg = Config()
    assert cfg.data.task == "synthetic" and cfg.data.synthetic_task == "shapes"
    assert cfg.tolerance() == 2.0 and cfg.data.resolved("rule") == "number of shapes"
    assert (cfg.data.resolved("value_min"), cfg.data.resolved("value_max"), cfg.data.resolved("metric")) == (
        0.0,
        9.0,
        "accuracy",
    )
    bar = load_config(None, ["data.synthetic_task=bar"])
    assert bar.tolerance() == 1.0 and bar.data.resolved("value_range") == "a number from 0 to 10"
    assert load_config(None, ["data.synthetic_task=bar", "data.tolerance=0.5"]).tolerance() == 0.5
    assert load_config(None, ["data.task=age", "data.root=/d"]).data.resolved("value_max") == 116.0


def test_value_bounds_resolve_or_raise(tmp_path: Path):
    jsonl = ["data.task=jsonl", "data.root=m.jsonl", "data.rule=size", "data.tolerance=1"]
    cfg = load_config(None, [*jsonl, "data.value_range=a number from -2.5 to 7"])
    assert (cfg.data.resolved("value_min"), cfg.data.resolved("value_max")) == (-2.5, 7.0)
    assert cfg.data.resolved("metric") == "mae"
    cfg = load_config(None, [*jsonl, "data.value_range=a size", "data.value_min=1", "data.value_max=3"])
    assert (cfg.data.resolved("value_min"), cfg.data.resolved("value_max")) == (1.0, 3.0)
    err = _error(tmp_path, "", (*jsonl, "data.value_range=a size"))
    assert err.key == "data.value_min" and "from A to B" in str(err)
    err = _error(tmp_path, "", ("data.value_min=9",))
    assert err.key == "data.value_max" and "must be > value_min" in str(err)
    for override, key in (
        ("data.test_fraction=1.0", "data.test_fraction"),
        ("data.synthetic_train_size=0", "data.synthetic_train_size"),
        ("data.train_groups_per_n=0", "data.train_groups_per_n"),
        ("data.image_cache_mb=-1", "data.image_cache_mb"),
        ("data.check_images=maybe", "data.check_images"),
        ("data.synthetic_task=dots", "data.synthetic_task"),
    ):
        assert _error(tmp_path, "", (override,)).key == key


def _alias_bomb(levels: int, under: str = "data:\n  root: ") -> str:
    """Nested YAML aliases: ``levels`` lists of 9 aliases of the one before, 9**levels strings when expanded."""
    parts = ['&l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    parts += [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return under + "[" + ", ".join(parts) + "]\n"


@pytest.mark.timeout(20)  # expanding even once would never end: 9**30 strings
def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path, capsys):
    from rarl_fast.cli import main

    err = _error(tmp_path, _alias_bomb(30))
    assert "aliases expand to more than 10000 extra nodes" in str(err) and len(str(err)) < 200
    small = _write(tmp_path, _alias_bomb(9))  # the size of a few hundred bytes that took 47 s and a MemoryError
    assert len(small.read_bytes()) < 500
    assert main(["config", "-c", str(small)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and err_text.startswith(f"rarl-fast: error: {small}: refused: its aliases")
    with pytest.raises(ConfigError, match="refused: its aliases"):
        load_config(None, ["data.root=" + _alias_bomb(30, under="")])
    assert "recursive" in str(_error(tmp_path, "data:\n  root: &a [1, *a]\n"))
    cfg = load_config(_write(tmp_path, "stage1: &same {lr: 0.001}\nstage2: *same\n"))  # aliases of normal use
    assert cfg.stage1.lr == cfg.stage2.lr == 0.001


@pytest.mark.parametrize(
    "override, key",
    [
        ("seed=100000000000000000000000000000000000000", "seed"),
        ("seed=4294967296", "seed"),
        ("data.seed=-1", "data.seed"),
        ("cpu_threads=100000000000000000000", "cpu_threads"),
        ("cpu_threads=5000", "cpu_threads"),
        ("rollout.max_new_tokens=100000000000000000000", "rollout.max_new_tokens"),
        ("rollout.max_new_tokens=2000000", "rollout.max_new_tokens"),
        ("data.num_test_groups=1000000000", "data.num_test_groups"),
        ("rollout.top_k=3000000000", "rollout.top_k"),
    ],
)
def test_integers_are_bounded_by_what_takes_them(override: str, key: str):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key and f"'{override}'" in str(info.value)


def test_error_messages_show_a_bounded_value(tmp_path: Path):
    err = _error(tmp_path, "seed: " + "x" * 100_000 + "\n")
    assert err.key == "seed" and len(str(err)) < 300
    err = _error(tmp_path, "data:\n  root: " + str([list(range(200))] * 10) + "\n")
    assert err.key == "data.root" and len(str(err)) < 300


def test_yaml_1_1_booleans_are_strings_for_string_fields(tmp_path: Path):
    cfg = load_config(_write(tmp_path, "data:\n  check_images: off\nlogging:\n  progress_bar: no\nrun_name: yes\n"))
    assert (cfg.data.check_images, cfg.logging.progress_bar, cfg.run_name) == ("off", False, "yes")
    assert load_config(None, ["data.check_images=off", "model.use_liger=on"]).model.use_liger is True
    err = _error(tmp_path, "run_name: false\n")
    assert err.key == "run_name" and "quote it" in str(err)
    dumped = dump_config(cfg)  # 'off' values written quoted: any YAML reader takes them as the string
    assert "check_images: 'off'" in dumped and "compile: 'off'" in dumped and dumped.count("'off'") == 2


def test_errors_are_blamed_on_their_source(tmp_path: Path):
    err = _error(tmp_path, "seed: 1\n", ("reward.alpha=0.9",))  # the failing key is reward.beta, set by nobody
    assert err.key == "reward.beta" and "(command-line override 'reward.alpha=0.9')" in str(err)
    err = _error(tmp_path, "reward:\n  alpha: 0.9\n", ("seed=3",))
    assert "cfg.yaml" in str(err) and "override" not in str(err)
    err = _error(tmp_path, "- 1\n")  # the file as a whole: no empty key
    assert str(err).startswith(f"{tmp_path / 'cfg.yaml'}: the top level must be a mapping")
    assert "config key ''" not in str(err)


def test_unreadable_config_files_are_config_errors(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"seed: 1\nrun_name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)


def test_overrides_anywhere_on_the_command_line(tmp_path: Path, capsys):
    from rarl_fast.cli import main

    out = tmp_path / "x.yaml"
    assert main(["config", "seed=1", "--out", str(out), "seed=2", "run_name=last"]) == 0
    cfg = load_config(out)
    assert (cfg.seed, cfg.run_name) == (2, "last")
    assert main(["config", "--out", str(out), "not-an-override"]) == 2
    assert "not of the form key.sub=value: 'not-an-override'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["config", "seed=1", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_loss_options_are_the_kernels():
    """The config's loss types are `rarl_kernels.LOSS_TYPES`, it refuses exactly the (loss type, level) pairs the
    kernels refuse, and the options the trainer passes on are fields here and keywords of the fused loss."""
    import inspect
    import typing

    from rarl_fast import config
    from rarl_fast.policy import _KERNEL_OPTIONS
    from rarl_kernels import LOSS_TYPES, fused_linear_grpo_loss
    from rarl_kernels.loss_types import IMPORTANCE_SAMPLING_LEVELS, check_loss_options

    assert typing.get_args(config.LossType) == LOSS_TYPES
    assert typing.get_args(config.ImportanceSamplingLevel) == IMPORTANCE_SAMPLING_LEVELS
    for loss_type in LOSS_TYPES:
        for level in IMPORTANCE_SAMPLING_LEVELS:
            try:
                check_loss_options(loss_type, level)
                kernels_ok = True
            except ValueError:
                kernels_ok = False
            try:
                config.LossConfig(loss_type=loss_type, importance_sampling_level=level)
                config_ok = True
            except ConfigError:
                config_ok = False
            assert config_ok == kernels_ok, (loss_type, level)
    fields = {f.name for f in dataclasses.fields(config.LossConfig)}
    keywords = set(inspect.signature(fused_linear_grpo_loss).parameters)
    assert set(_KERNEL_OPTIONS) <= fields & keywords
    from rarl_kernels import LossOptions

    defaults = config.LossConfig()
    for name in (*_KERNEL_OPTIONS, "eps_low", "eps_high"):
        assert getattr(defaults, name) == LossOptions._field_defaults[name], name
    assert defaults.beta_kl == LossOptions._field_defaults["beta"]
    from rarl_fast.policy import LossSettings

    chosen = dict(loss_type="vespo", delta=2.5, sapo_temperature_neg=1.5, vespo_k_pos=1.25, bias_correction_kl=True)
    settings = LossSettings.from_config(config_from_dict({"loss": chosen}))
    assert settings.loss_type == "vespo"
    assert {k: settings.options[k] for k in chosen if k != "loss_type"} == {k: v for k, v in chosen.items()
                                                                           if k != "loss_type"}  # fmt: skip
