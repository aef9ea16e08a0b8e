// Torch operators over the WKV-7 kernels, registered as torch.ops.rwkv_app.* (see rwkv_app/ops/cuda.py for the
// Python API and the autograd wiring). Inputs must already be contiguous CUDA tensors of one dtype, bf16 or fp32;
// states fp32. A config of -1 lets the library choose the launch configuration for the shape.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <tuple>

#include "wkv7.h"

namespace {

using at::Tensor;

const char* pass_name(wkv7::Pass p) {
    return p == wkv7::Pass::Forward ? "forward" : p == wkv7::Pass::Rows ? "rows" : "cols";
}

void check_cuda(cudaError_t e, const char* what) {
    TORCH_CHECK(e == cudaSuccess, "rwkv_app wkv7 ", what, ": ", cudaGetErrorString(e));
}

void check_same(const Tensor& x, const Tensor& ref, const char* name, bool same_shape) {
    TORCH_CHECK(x.is_cuda() && x.device() == ref.device(), "wkv7: ", name, " must be on ", ref.device());
    TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "wkv7: ", name, " must be ", ref.scalar_type(), ", got ",
                x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv7: ", name, " must be contiguous");
    if (same_shape)
        TORCH_CHECK(x.sizes() == ref.sizes(), "wkv7: ", name, " has shape ", x.sizes(), ", expected ", ref.sizes());
}

void check_f32(const Tensor& x, const Tensor& ref, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(x.is_cuda() && x.device() == ref.device(), "wkv7: ", name, " must be on ", ref.device());
    TORCH_CHECK(x.scalar_type() == at::kFloat, "wkv7: ", name, " must be float32, got ", x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv7: ", name, " must be contiguous");
    TORCH_CHECK(x.sizes() == shape, "wkv7: ", name, " has shape ", x.sizes(), ", expected ", shape);
}

// Validates r..b: one dtype (bf16 or fp32), one shape ([B, T, H, N], or [B, H, N] for decode), contiguous, CUDA.
void check_inputs(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
                  int64_t dims) {
    TORCH_CHECK(r.is_cuda(), "wkv7: inputs must be CUDA tensors");
    TORCH_CHECK(r.dim() == dims, "wkv7: inputs must have ", dims, " dimensions, got shape ", r.sizes());
    TORCH_CHECK(r.scalar_type() == at::kBFloat16 || r.scalar_type() == at::kFloat,
                "wkv7: inputs must be bfloat16 or float32, got ", r.scalar_type());
    check_same(r, r, "r", true);
    check_same(w, r, "w", true);
    check_same(k, r, "k", true);
    check_same(v, r, "v", true);
    check_same(a, r, "a", true);
    check_same(b, r, "b", true);
    const int64_t N = r.size(-1);
    TORCH_CHECK(wkv7::head_size_supported(static_cast<int>(N)), "wkv7: head size ", N,
                " is not compiled (supported: 32, 64, 128)");
}

int multiprocessors() {
    int device = 0, sms = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    return sms;
}

int resolve_config(int64_t config, wkv7::Pass pass, int64_t heads, int64_t N) {
    if (config < 0) {
        const int sms = multiprocessors();
        return wkv7::choose_config(pass, static_cast<int>(heads), static_cast<int>(N), sms);
    }
    TORCH_CHECK(config < wkv7::num_configs(static_cast<int>(N)), "wkv7: ", pass_name(pass), " config ", config,
                " out of range for head size ", N);
    return static_cast<int>(config);
}

template <typename E, typename A>
const E* cptr(const Tensor& t) { return reinterpret_cast<const E*>(t.data_ptr<A>()); }
template <typename E, typename A>
E* mptr(const Tensor& t) { return reinterpret_cast<E*>(t.data_ptr<A>()); }

template <typename E, typename A>
wkv7::Inputs<E> inputs_of(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a,
                          const Tensor& b) {
    return wkv7::Inputs<E>{cptr<E, A>(r), cptr<E, A>(w), cptr<E, A>(k), cptr<E, A>(v), cptr<E, A>(a), cptr<E, A>(b),
                           static_cast<int>(r.size(0)), static_cast<int>(r.size(1)), static_cast<int>(r.size(2)),
                           static_cast<int>(r.size(3))};
}

bool is_bf16(const Tensor& t) { return t.scalar_type() == at::kBFloat16; }

template <typename E, typename A>
void forward_as(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
                const Tensor& state_in, const Tensor& state_out, const Tensor& y, const Tensor* sa, const Tensor* ckpt,
                int cfg, cudaStream_t st) {
    check_cuda(wkv7::forward<E>(inputs_of<E, A>(r, w, k, v, a, b), state_in.data_ptr<float>(),
                                state_out.data_ptr<float>(), mptr<E, A>(y), sa ? sa->data_ptr<float>() : nullptr,
                                ckpt ? ckpt->data_ptr<float>() : nullptr, sa != nullptr, cfg, st),
               "forward");
}

// Forward over all steps; sa and ckpt null for prefill (no saved activations). state_in may be state_out.
void run_forward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
                 const Tensor& state_in, const Tensor& state_out, const Tensor& y, const Tensor* sa, const Tensor* ckpt,
                 int64_t config) {
    const int64_t B = r.size(0), H = r.size(2), N = r.size(3);
    if (B * H == 0) return;
    const int cfg = resolve_config(config, wkv7::Pass::Forward, B * H, N);
    const cudaStream_t st = c10::cuda::getCurrentCUDAStream().stream();
    if (is_bf16(r))
        forward_as<__nv_bfloat16, at::BFloat16>(r, w, k, v, a, b, state_in, state_out, y, sa, ckpt, cfg, st);
    else
        forward_as<float, float>(r, w, k, v, a, b, state_in, state_out, y, sa, ckpt, cfg, st);
}

template <typename E, typename A>
void backward_as(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
                 const Tensor& sa, const Tensor& ckpt, const Tensor& dy, const float* ds_out, const Tensor& gb,
                 const Tensor& dr, const Tensor& dw, const Tensor& dk, const Tensor& dv, const Tensor& da,
                 const Tensor& db, const Tensor& dstate_in, int cr, int cc, cudaStream_t st) {
    const auto x = inputs_of<E, A>(r, w, k, v, a, b);
    check_cuda(wkv7::backward_rows<E>(x, cptr<E, A>(dy), ds_out, mptr<E, A>(dv), gb.data_ptr<float>(),
                                      dstate_in.data_ptr<float>(), cr, st),
               "backward (rows)");
    check_cuda(wkv7::backward_cols<E>(x, cptr<E, A>(dy), sa.data_ptr<float>(), gb.data_ptr<float>(),
                                      ckpt.data_ptr<float>(), ds_out, mptr<E, A>(dr), mptr<E, A>(dw), mptr<E, A>(dk),
                                      mptr<E, A>(da), mptr<E, A>(db), cc, st),
               "backward (cols)");
}

template <typename E, typename A>
void decode_as(Tensor& table, const Tensor& slots, const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
               const Tensor& a, const Tensor& b, const Tensor& y, const std::optional<Tensor>& g,
               const std::optional<Tensor>& ln_w, const std::optional<Tensor>& ln_b, const std::optional<Tensor>& r_k,
               double eps, cudaStream_t st) {
    wkv7::Readout<E> ro;
    if (g) {
        ro.g = cptr<E, A>(*g);
        ro.ln_w = cptr<E, A>(*ln_w);
        ro.ln_b = cptr<E, A>(*ln_b);
        ro.r_k = cptr<E, A>(*r_k);
        ro.eps = static_cast<float>(eps);
    }
    check_cuda(wkv7::decode<E>(table.data_ptr<float>(), table.size(0), slots.data_ptr<int64_t>(), cptr<E, A>(r),
                               cptr<E, A>(w), cptr<E, A>(k), cptr<E, A>(v), cptr<E, A>(a), cptr<E, A>(b),
                               mptr<E, A>(y), static_cast<int>(r.size(0)), static_cast<int>(r.size(1)),
                               static_cast<int>(r.size(2)), ro, st),
               "decode");
}

// ---------------------------------------------------------------------------------------------------------------
// operators

std::tuple<Tensor, Tensor, Tensor, Tensor> wkv7_fwd(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                                    const Tensor& a, const Tensor& b, const Tensor& state,
                                                    int64_t config) {
    check_inputs(r, w, k, v, a, b, 4);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    check_f32(state, r, "state", {B, H, N, N});
    const c10::cuda::CUDAGuard guard(r.device());
    const auto f32 = r.options().dtype(at::kFloat);
    Tensor y = at::empty_like(r);
    Tensor state_out = at::empty({B, H, N, N}, f32);
    Tensor sa = at::empty({B, T, H, N}, f32);
    Tensor ckpt = at::empty({B, H, (T + wkv7::kChunk - 1) / wkv7::kChunk, N, N}, f32);
    if (B * H == 0) state_out.copy_(state);
    run_forward(r, w, k, v, a, b, state, state_out, y, &sa, &ckpt, config);
    return {y, state_out, sa, ckpt};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv7_bwd(
    const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
    const Tensor& sa, const Tensor& ckpt, const Tensor& dy, const std::optional<Tensor>& dstate, int64_t config_rows,
    int64_t config_cols) {
    check_inputs(r, w, k, v, a, b, 4);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    check_same(dy, r, "dy", true);
    check_f32(sa, r, "sa", {B, T, H, N});
    check_f32(ckpt, r, "ckpt", {B, H, (T + wkv7::kChunk - 1) / wkv7::kChunk, N, N});
    const float* ds_out = nullptr;
    if (dstate.has_value() && dstate->defined()) {
        check_f32(*dstate, r, "dstate", {B, H, N, N});
        ds_out = dstate->data_ptr<float>();
    }
    const c10::cuda::CUDAGuard guard(r.device());
    Tensor dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r), dv = at::empty_like(r);
    Tensor da = at::empty_like(r), db = at::empty_like(r);
    Tensor dstate_in = at::empty({B, H, N, N}, r.options().dtype(at::kFloat));
    if (B * H == 0) return {dr, dw, dk, dv, da, db, dstate_in};
    Tensor gb = at::empty({B, T, H, N}, r.options().dtype(at::kFloat));
    const int cr = resolve_config(config_rows, wkv7::Pass::Rows, B * H, N);
    const int cc = resolve_config(config_cols, wkv7::Pass::Cols, B * H, N);
    const cudaStream_t st = c10::cuda::getCurrentCUDAStream().stream();
    if (is_bf16(r))
        backward_as<__nv_bfloat16, at::BFloat16>(r, w, k, v, a, b, sa, ckpt, dy, ds_out, gb, dr, dw, dk, dv, da, db,
                                                 dstate_in, cr, cc, st);
    else
        backward_as<float, float>(r, w, k, v, a, b, sa, ckpt, dy, ds_out, gb, dr, dw, dk, dv, da, db, dstate_in, cr,
                                  cc, st);
    return {dr, dw, dk, dv, da, db, dstate_in};
}

Tensor wkv7_prefill(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a,
                    const Tensor& b, Tensor& state, int64_t config) {
    check_inputs(r, w, k, v, a, b, 4);
    const int64_t B = r.size(0), H = r.size(2), N = r.size(3);
    check_f32(state, r, "state", {B, H, N, N});
    const c10::cuda::CUDAGuard guard(r.device());
    Tensor y = at::empty_like(r);
    run_forward(r, w, k, v, a, b, state, state, y, nullptr, nullptr, config);
    return y;
}

// With g (and then ln_w, ln_b, r_k), the output is the block's readout of y (see wkv7::Readout), not y.
Tensor wkv7_decode(Tensor& table, const Tensor& slots, const Tensor& r, const Tensor& w, const Tensor& k,
                   const Tensor& v, const Tensor& a, const Tensor& b, const std::optional<Tensor>& g,
                   const std::optional<Tensor>& ln_w, const std::optional<Tensor>& ln_b,
                   const std::optional<Tensor>& r_k, double eps) {
    check_inputs(r, w, k, v, a, b, 3);
    const int64_t B = r.size(0), H = r.size(1), N = r.size(2);
    TORCH_CHECK(table.dim() == 4, "wkv7 decode: state table must be [S, H, N, N], got ", table.sizes());
    check_f32(table, r, "state table", {table.size(0), H, N, N});
    TORCH_CHECK(slots.is_cuda() && slots.device() == r.device() && slots.scalar_type() == at::kLong &&
                    slots.dim() == 1 && slots.size(0) == B && slots.is_contiguous(),
                "wkv7 decode: slots must be a contiguous int64 CUDA tensor of shape [", B, "]");
    TORCH_CHECK(g.has_value() == ln_w.has_value() && g.has_value() == ln_b.has_value() &&
                    g.has_value() == r_k.has_value(),
                "wkv7 decode: the readout needs all of g, ln_w, ln_b and r_k, or none");
    if (g) {
        check_same(*g, r, "g", true);
        for (const auto& [t, name] : {std::pair{&*ln_w, "ln_w"}, std::pair{&*ln_b, "ln_b"}, std::pair{&*r_k, "r_k"}}) {
            check_same(*t, r, name, false);
            TORCH_CHECK(t->numel() == H * N, "wkv7 decode: ", name, " must have ", H * N, " elements, got ",
                        t->numel());
        }
        TORCH_CHECK(eps > 0, "wkv7 decode: the readout's eps must be positive, got ", eps);
    }
    const c10::cuda::CUDAGuard guard(r.device());
    Tensor y = at::empty_like(r);
    if (B * H == 0) return y;
    const cudaStream_t st = c10::cuda::getCurrentCUDAStream().stream();
    if (is_bf16(r))
        decode_as<__nv_bfloat16, at::BFloat16>(table, slots, r, w, k, v, a, b, y, g, ln_w, ln_b, r_k, eps, st);
    else
        decode_as<float, float>(table, slots, r, w, k, v, a, b, y, g, ln_w, ln_b, r_k, eps, st);
    return y;
}

// The config id auto-selection would use (pass 0 forward, 1 rows, 2 cols), for benchmarks and tests.
int64_t wkv7_auto_config(int64_t pass, int64_t heads, int64_t head_size) {
    TORCH_CHECK(pass >= 0 && pass <= 2, "wkv7_auto_config: pass must be 0, 1 or 2");
    TORCH_CHECK(wkv7::head_size_supported(static_cast<int>(head_size)), "wkv7: head size ", head_size, " not compiled");
    return wkv7::choose_config(static_cast<wkv7::Pass>(pass), static_cast<int>(heads), static_cast<int>(head_size),
                               multiprocessors());
}

int64_t wkv7_num_configs(int64_t head_size) { return wkv7::num_configs(static_cast<int>(head_size)); }

}  // namespace

TORCH_LIBRARY(rwkv_app, m) {
    m.def("wkv7_fwd(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor state, int config=-1) "
          "-> (Tensor y, Tensor state_out, Tensor sa, Tensor ckpt)");
    m.def("wkv7_bwd(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor sa, Tensor ckpt, Tensor dy, "
          "Tensor? dstate, int config_rows=-1, int config_cols=-1) "
          "-> (Tensor dr, Tensor dw, Tensor dk, Tensor dv, Tensor da, Tensor db, Tensor dstate_in)");
    m.def("wkv7_prefill(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor(s!) state, "
          "int config=-1) -> Tensor");
    m.def("wkv7_decode(Tensor(s!) state_table, Tensor slots, Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, "
          "Tensor b, Tensor? g=None, Tensor? ln_w=None, Tensor? ln_b=None, Tensor? r_k=None, float eps=0.) "
          "-> Tensor");
    m.def("wkv7_auto_config(int pass_id, int heads, int head_size) -> int", &wkv7_auto_config);
    m.def("wkv7_num_configs(int head_size) -> int", &wkv7_num_configs);
}

TORCH_LIBRARY_IMPL(rwkv_app, CUDA, m) {
    m.impl("wkv7_fwd", &wkv7_fwd);
    m.impl("wkv7_bwd", &wkv7_bwd);
    m.impl("wkv7_prefill", &wkv7_prefill);
    m.impl("wkv7_decode", &wkv7_decode);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.doc() = "WKV-7 CUDA kernels; importing registers torch.ops.rwkv_app.wkv7_*";
}
