// Argument checks shared by the CPU and CUDA launchers: the last line of defence behind emovec.ops.
#include "steer_project.h"

namespace emovec {

namespace {
void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("emovec._C.steer_project: " + what);
}
bool valid_dtype(int code) { return code == kFloat32 || code == kFloat16 || code == kBFloat16; }
}  // namespace

void check_args(const SteerProjectArgs& a) {
  require(a.n >= 0 && a.d >= 1, "need n >= 0 and d >= 1");
  require(a.n == 0 || a.h != nullptr, "h is null");
  require(a.h_row_stride >= a.d || a.n <= 1, "h row stride must be >= d");
  require(valid_dtype(a.h_dtype), "h dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  // fp32 rows may read bf16 probes (half the bytes; monitoring only: no other weights), on the CPU
  const bool bf16_probes = a.h_dtype == kFloat32 && a.w_dtype == kBFloat16 && a.table == nullptr &&
                           a.ablate == nullptr && a.center == nullptr && a.clamp == nullptr;
  require(a.w_dtype == kFloat32 || a.w_dtype == a.h_dtype || bf16_probes,
          "weights must be fp32 or h's dtype (or bf16 probes alone for fp32 h)");
  require(!a.round_rows_bf16 || (a.h_dtype == kFloat32 && a.w_dtype == kBFloat16 && bf16_probes),
          "bf16 dots (rows rounded to bf16) need fp32 h and bf16 probes, with no other weights");
  require(a.table == nullptr || a.slots != nullptr, "a steering table needs slots");
  require(a.table == nullptr || a.table_rows >= 1, "table needs at least one row");
  require(a.num_ablate >= 0 && (a.num_ablate == 0) == (a.ablate == nullptr), "ablate and num_ablate disagree");
  require(a.num_clamp >= 0 && (a.num_clamp == 0) == (a.clamp == nullptr), "clamp and num_clamp disagree");
  require((a.clamp == nullptr) == (a.bounds == nullptr), "clamp needs bounds, and bounds need clamp");
  require(a.bounds == nullptr || a.table_rows >= 1, "bounds need at least one row");
  require(a.bounds == nullptr || a.slots != nullptr || a.table_rows == 1, "bounds without slots must have one row");
  require(a.corrections == nullptr || a.clamp != nullptr, "corrections requested without clamp");
  require(a.num_probes >= 0 && (a.num_probes == 0 || a.probes != nullptr), "probes missing");
  require(a.scores == nullptr || a.num_probes > 0, "scores requested without probes");
  require((a.sums == nullptr) == (a.segments == nullptr) && (a.sums == nullptr) == (a.counts == nullptr),
          "capture needs segments, sums and counts together");
  require(a.sums == nullptr || a.num_segments >= 1, "capture needs num_segments >= 1");
  require(a.scores_row_stride == 0 || a.scores_row_stride >= a.num_probes, "scores row stride must be >= num_probes");
  require(a.norms_stride >= 0, "norms stride must be >= 0");
}

}  // namespace emovec
