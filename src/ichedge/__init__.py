"""ichedge: intracranial hemorrhage detection on head CT with MobileNetV2 models for edge devices."""

import os

# TensorFlow's own C++ info and warnings off wherever ichedge is used (a notebook, a script);
# the `ichedge` command hides the rest of the start-up lines too unless --verbose.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
