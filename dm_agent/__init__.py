"""dm-agent: the DockMaster node agent."""

import warnings

__version__ = "0.1.0"

# The frozen program leaves out requests' optional charset guessers (3 MB of memory for
# a log line's worth of use); requests then assumes UTF-8 and says so at import time.
warnings.filterwarnings("ignore", message="Unable to find acceptable character detection")
