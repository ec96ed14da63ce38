"""ichedge: intracranial hemorrhage detection on head CT with MobileNetV2 models for edge devices."""

__version__ = "0.1.0"
