"""Ways a trained network leaves netbuild: :mod:`netbuild.export.onnx` writes it as an ONNX graph."""
