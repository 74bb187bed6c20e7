"""SkyPilot's own optimizer, offline, on the repository's catalogs: for each accelerator name
given, the resources SkyPilot launches for `<name>:1` with OptimizeTarget.COST over Vast.ai,
Lambda and AWS (on-demand; AWS spot too). Run with a Python that has skypilot (0.14.x):

    /path/to/sky-venv/bin/python benchmarks/sky_pick.py RTX4090 L4 A10G

Prints one JSON object {name: {cloud, instance_type, region, usd_per_hour, spot}}. It follows the
offline recipe in catalogs/README.md: a throwaway HOME with the catalogs copied in, telemetry off,
the enabled-clouds cache seeded (no credentials, no network). Vast spot is not asked for: Vast's
catalog writes SpotPrice 0.00, which SkyPilot prices as free."""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

CATALOGS = Path(__file__).resolve().parents[1] / "catalogs" / "v8"


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="sky-home-"))
    shutil.copytree(CATALOGS, home / ".sky" / "catalogs" / "v8")
    os.environ["HOME"] = str(home)  # before `import sky`: SkyPilot computes its paths at import
    os.environ["SKYPILOT_DISABLE_USAGE_COLLECTION"] = "1"
    import sky
    from sky import check, global_user_state, optimizer, skypilot_config
    from sky.clouds import cloud as cloud_mod

    workspace = skypilot_config.get_active_workspace()
    global_user_state.set_allowed_clouds(check._get_workspace_allowed_clouds(workspace), workspace)
    global_user_state.set_enabled_clouds(["Vast", "Lambda", "AWS"], cloud_mod.CloudCapability.COMPUTE, workspace)
    picks = {}
    for name in sys.argv[1:]:
        candidates = {sky.Resources(infra=infra, accelerators=f"{name}:1", use_spot=spot)
                      for infra in ("vast", "lambda", "aws") for spot in ((False, True) if infra == "aws" else (False,))}
        with sky.Dag() as dag:
            sky.Task(run="true").set_resources(candidates)
        optimizer.Optimizer.optimize(dag, minimize=sky.OptimizeTarget.COST, quiet=True)
        best = dag.tasks[0].best_resources
        picks[name] = {"cloud": str(best.cloud).lower(), "instance_type": best.instance_type, "region": best.region,
                       "usd_per_hour": best.get_cost(3600), "spot": best.use_spot}
    shutil.rmtree(home, ignore_errors=True)
    print("SKY_PICKS " + json.dumps(picks))


if __name__ == "__main__":
    main()
