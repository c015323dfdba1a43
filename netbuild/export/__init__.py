"""Ways a trained network leaves netbuild: :mod:`netbuild.export.onnx` writes it as an ONNX graph.

The opsets netbuild writes sit here, so that the command line can name them without importing the
exporter (and the layers behind it).
"""

#: The opset written by default: the oldest with LayerNormalization (17), so that older runtimes
#: load the file too. Every operator netbuild writes has the same meaning up to :data:`MAX_OPSET`
#: (the reductions take their axes as an input from 18 on; the exporter writes either form).
DEFAULT_OPSET = 17
MIN_OPSET = 17
#: The newest opset written: the onnxruntime of the ``onnx`` extra (1.32) runs the operators
#: netbuild writes at every opset up to this one (the tests export every row of the layer table
#: and every recurrent variant at both ends).
MAX_OPSET = 28
