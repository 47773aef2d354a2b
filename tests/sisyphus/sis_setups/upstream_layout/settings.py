# Settings as a setup written for the reference Sisyphus has them: a recipe collection under recipe/ imported
# by its package name, environment changes in place, outputs of each config in their own subfolder.
IMPORT_PATHS = ["config", "recipe/"]
DEFAULT_ENVIRONMENT_SET["DEMO_GREETING"] = "hello from settings"
DEFAULT_ENVIRONMENT_KEEP.add("DEMO_SETUP")
WAIT_PERIOD_BETWEEN_CHECKS = 0.5
WAIT_PERIOD_JOB_FS_SYNC = 0
WAIT_PERIOD_JOB_CLEANUP = 0


def engine():
    from sisyphus.engine import EngineSelector
    from sisyphus.localengine import LocalEngine

    return EngineSelector(engines={"short": LocalEngine(cpu=1, mem=1), "long": LocalEngine(cpu=2, mem=2)},
                          default_engine="long")
