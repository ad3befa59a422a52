"""torchx components build the AppDefs that run our CLI."""

from pipelines import components


def _args(app) -> list[str]:
    return [str(a) for a in app.roles[0].args]


def test_train_component_is_ddp_over_train_script():
    app = components.train(
        "train.epochs=1",
        "pep.budgets=[0.1]",
        config="configs/debug_cpu_search.yaml",
        data="out/d",
        run_dir="runs/s",
        j="2x8",
        gpu=8,
    )
    args = " ".join(_args(app))
    assert "pep_torchrec/train.py" in args and "--nnodes 2" in args and "--nproc_per_node 8" in args
    assert "--set train.epochs=1" in args and "pep.budgets=[0.1]" in args
    assert app.roles[0].env["OMP_NUM_THREADS"] == "1"


def test_single_process_components_call_the_cli():
    assert _args(components.prepare(dataset="criteo", raw="raw", out="out/c", min_count=10))[:2] == [
        "-m",
        "pep_torchrec.cli",
    ]
    assert "--min-count" in _args(components.prepare(dataset="criteo", raw="raw", out="out/c", min_count=10))
    assert _args(components.prune(run_dir="runs/b", out="runs/m"))[2:4] == ["prune", "--run-dir"]
    assert _args(components.report(run_dir="runs/s"))[2:] == ["report", "--run-dir", "runs/s"]


def test_train_component_restarts_resume_by_themselves():
    app = components.train(config="c.yaml", data="d", run_dir="r", max_restarts=2, max_retries=1)
    args = " ".join(_args(app))
    assert "--auto-resume" in args and "--resume " not in args
    assert app.roles[0].env["PET_MAX_RESTARTS"] == "2"  # torchrun's --max-restarts
    assert app.roles[0].env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert app.roles[0].max_retries == 1
    plain = components.train(config="c.yaml", data="d", run_dir="r", resume=True)
    assert "--resume" in " ".join(_args(plain)) and "--auto-resume" not in " ".join(_args(plain))
