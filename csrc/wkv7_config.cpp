// Which compiled configuration runs a pass for a given shape (see WKV7_CONFIGS_* in wkv7.h).
#include "wkv7.h"

namespace wkv7 {

namespace {
#define WKV7_ROW(id, P, R, LB) Config{P, R, LB},
const Config kConfigs32[] = {WKV7_CONFIGS_32(WKV7_ROW)};
const Config kConfigs64[] = {WKV7_CONFIGS_64(WKV7_ROW)};
const Config kConfigs128[] = {WKV7_CONFIGS_128(WKV7_ROW)};
#undef WKV7_ROW

template <size_t n>
constexpr int count(const Config (&)[n]) { return static_cast<int>(n); }
}  // namespace

bool head_size_supported(int N) { return N == 32 || N == 64 || N == 128; }

int num_configs(int N) {
    switch (N) {
        case 32: return count(kConfigs32);
        case 64: return count(kConfigs64);
        case 128: return count(kConfigs128);
    }
    return 0;
}

Config config_of(int N, int id) {
    switch (N) {
        case 32: return kConfigs32[id];
        case 64: return kConfigs64[id];
        case 128: return kConfigs128[id];
    }
    return Config{0, 0, 0};
}

int choose_config(Pass pass, int heads, int N, int sms) {
    if (N == 64) {
        // Measured on an H100 (132 SMs), see benchmarks/RESULTS.md: with two warps per head already filling the
        // GPU (512 heads), one full line per thread (cols) or two half lines (forward, rows) is fastest; below that
        // (384 heads and fewer) two lanes per line with 128-thread blocks wins, except that the column pass of very
        // few heads (64) does better with eight lanes per line.
        if (2LL * heads >= 7LL * sms) return pass == Pass::Cols ? 0 : 1;
        if (pass == Pass::Cols && 4LL * heads < 3LL * sms) return 4;
        return 2;
    }
    // Other head sizes: the fewest threads per line that still puts about five warps on every multiprocessor.
    const long long target = 5LL * sms;
    const int n = num_configs(N);
    for (int id = 0; id < n; id++) {
        const Config c = config_of(N, id);
        if (static_cast<long long>(heads) * N * c.P / c.R / 32 >= target) return id;
    }
    return n - 1;
}

}  // namespace wkv7
