"""kdlib: reproducible knowledge distillation for image classification.

A library: functions take arguments and return values. It never reads ``params.yaml`` and
never imports DVC; the pipeline's stages in ``stages/`` do that.
"""
__version__ = "0.1.0"
