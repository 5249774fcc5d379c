// Operator schemas of the deformable_attention and hash_dropout libraries and the
// Python module that loads them (import ops._C). Kernels are registered per device in
// ms_deform_attn_cpu.cpp, ms_deform_attn_cuda.cu and hash_dropout_cpu.cpp; autograd and the fake
// (shape-only) implementations are registered from Python (ops/kernel.py, ops/hash_dropout.py).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#ifndef MS_DEFORM_ATTN_WITH_CUDA
#define MS_DEFORM_ATTN_WITH_CUDA 0
#endif

TORCH_LIBRARY(deformable_attention, m) {
  // Shapes: value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64,
  // sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D).
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  // Returns the gradients of value, sampling_locations and attention_weights.
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
}

// Dropout whose mask is a hash of (seed, element index), CPU kernels in hash_dropout_cpu.cpp.
TORCH_LIBRARY(hash_dropout, m) {
  // Input of any shape and floating dtype, seed () int64 -> the input's shape, contiguous. Its own backward.
  m.def("dropout(Tensor input, Tensor seed, float p) -> Tensor");
  // dropout of relu(input + bias) in one pass, bias (C,) over the last dimension (even) of the
  // input, or none: the mask equals dropout's under the same seed. Its backward takes the
  // forward's output: grad / (1 - p) where output > 0, else 0.
  m.def("relu_dropout(Tensor input, Tensor? bias, Tensor seed, float p) -> Tensor");
  m.def("relu_dropout_backward(Tensor grad_output, Tensor output, float p) -> Tensor");
}

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled kernels of multi-scale deformable attention and hash dropout; the operators live in "
    "torch.ops.deformable_attention and torch.ops.hash_dropout.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_definition);
  if (module == nullptr) {
    return nullptr;
  }
  // Read by ops/extension.py: whether the CUDA kernels are compiled in, and
  // the torch version the library was built against (a library built against
  // another torch may load but must not be used).
  if (PyModule_AddIntConstant(module, "with_cuda", MS_DEFORM_ATTN_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(module, "torch_version", TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
