// The extension's Python bindings: the last part of the translation unit that
// exprune_fx/runtime/fast.py builds from fast_kernels.cpp, conv_kernels.cpp and this file.

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("linear_site", &linear_site, "one call of a linear site: checks, cost model, kernel; None if not covered");
  module.def("choose", &choose, "the cost model: the kernel for one call of a linear site");
  module.def("linear_dense", &linear_dense, "the same site run dense (nothing pruned), counted");
  module.def("dense_site", &dense_site, "a site's epilogue a * z + c in place, counted as run dense");
  module.def("relu_linear", &relu_linear, "ExPrune early exit for relu(a * x @ w.T + c), float32 CPU");
  module.def(
      "conv_term_sums",
      [](const at::Tensor& x, const at::Tensor& weight, int64_t chans, int64_t terms, int64_t unit, int64_t kh,
         int64_t kw, int64_t oh, int64_t ow, std::vector<int64_t> stride, std::vector<int64_t> dilation,
         bool squares) {
        return conv_term_sums(x, weight, chans, terms, unit, kh, kw, oh, ow, stride, dilation, squares, nullptr);
      },
      "a conv site's first terms: sum and sum of squares per output");
  module.def("conv_head", &conv_head, "a conv site's first terms and single-stage test");
  module.def("conv_finish", &conv_finish, "a conv site's output from its head and remainder, counted");
  module.def("relu_linear_dense", &relu_linear_dense, "the same site for many rows: BLAS products, fused test");
}
