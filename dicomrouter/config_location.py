"""Where the configuration file is looked for; apart from config.py so that `dicomrouter --help` need not
import the config's loader."""

DEFAULT_CONFIG_NAME = "dicomrouter.yaml"
CONFIG_ENV_VAR = "DICOMROUTER_CONFIG"
