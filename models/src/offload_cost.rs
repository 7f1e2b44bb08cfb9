//! The cost model of issue 7 for experts in host memory: for each cold expert that a
//! batch of tokens routes to, compute it on the CPU (reading its weights from host memory)
//! or copy its weights to the GPU once for the batch and compute it there. Decode (one or
//! two tokens per expert) favours the CPU; long prefills, where many tokens share an
//! expert, favour the copy. The rates come from `mxr bench --calibrate-devices` (a JSON
//! file in the cache directory) or, without one, from conservative defaults.
//! docs/offload.md has the formulas and the rates measured on the GPU machine.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use mxr_quant::QType;

use crate::ModelError;

/// What a decode step pays for each layer whose cold experts run the CPU's way, beyond
/// reading them in place, in seconds: the GPU posts the layer's input and choices to the
/// host worker through mapped memory and waits for its rows, all inside the step's CUDA
/// graph (kernels/src/cuda/host_call.rs). Measured on the H200 machine (fifteenth session,
/// docs/PERF.md): S2x32 at 75% of its experts on the GPU (0.03 cold experts a token)
/// decodes a token in 0.98 ms the CPU's way against 0.90 ms in place, and at 50% in 1.03 ms
/// (6 MB cold: 0.09 ms of it the CPU's) against 0.95, over two layers: 0.04-0.045 ms a
/// layer. Before, the step left the graph for such layers (0.25 ms a layer), then a CUDA
/// host node stood in (0.13-0.16 ms). A constant, not calibrated: timing it needs a model.
pub const HOST_EXCHANGE_S: f64 = 0.05e-3;

/// Measured rates of this machine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceRates {
    /// Host memory read bandwidth, all cores, GB/s.
    pub host_read_gbps: f64,
    /// Weight bytes per second the CPU's expert kernels stream for one token (GB/s).
    pub cpu_expert_gbps: f64,
    /// CPU expert arithmetic on a batch of tokens, GFLOP/s.
    pub cpu_gflops: f64,
    /// Host-to-GPU copy from pageable memory (the mapped file), GB/s.
    pub h2d_gbps: f64,
    /// Host-to-GPU copy from pinned memory, GB/s.
    pub h2d_pinned_gbps: f64,
    /// Weight bytes per second the GPU's decode products read from a cold expert left in
    /// page-locked host pages mapped for the device (read in place over PCIe), GB/s.
    pub in_place_gbps: f64,
    /// The CPU's expert rate and the in-place rate while both run side by side (GB/s;
    /// `--cold-experts mixed`: they share the host's memory), as measured by
    /// `--calibrate-devices`; None where not measured, and then their rates alone.
    pub mixed_gbps: Option<(f64, f64)>,
}

/// How a decoded token computes its cold experts ([`DeviceRates::decode_way`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeWay {
    /// The GPU reads them in place over PCIe.
    InPlace,
    /// The CPU computes them (the host worker).
    Cpu,
    /// Each cold expert shared: the GPU reads part of its hidden units in place while the
    /// host worker computes the rest.
    Mixed,
}

/// Where a cold expert runs for one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColdChoice {
    Cpu,
    CopyToGpu,
}

/// Whether mixed's CPU share reads the cold experts' page-locked copy (experts of types
/// the GPU keeps as in the file), so that mixed holds them once in host memory; otherwise
/// (Q8_0, Q4_0 and Q6_K are repacked for the GPU) the CPU reads the file's pages.
pub fn mixed_reads_copy(expert_types: impl IntoIterator<Item = QType>) -> bool {
    expert_types.into_iter().all(mxr_kernels::cuda::matrix::as_in_file)
}

impl DeviceRates {
    /// Used when no calibration file exists: below what a current server measures, so that
    /// the copy is chosen only where it clearly pays.
    pub const DEFAULT: DeviceRates = DeviceRates {
        host_read_gbps: 40.0,
        cpu_expert_gbps: 20.0,
        cpu_gflops: 300.0,
        h2d_gbps: 10.0,
        h2d_pinned_gbps: 20.0,
        in_place_gbps: 20.0,
        mixed_gbps: None,
    };

    /// Seconds for the CPU to run one expert of `bytes` of weights over `tokens` tokens of
    /// `flops` each: bound by streaming the weights or by the arithmetic.
    pub fn cpu_seconds(&self, bytes: u64, tokens: usize, flops: f64) -> f64 {
        (bytes as f64 / (self.cpu_expert_gbps * 1e9)).max(tokens as f64 * flops / (self.cpu_gflops * 1e9))
    }

    /// Seconds to copy `bytes` of weights from the mapped file to the GPU (the GPU's own
    /// compute on them is far shorter and overlaps nothing here, so it is left out).
    pub fn copy_seconds(&self, bytes: u64) -> f64 {
        bytes as f64 / (self.h2d_gbps * 1e9)
    }

    /// These rates with the GPU's in-place reads as its copies, both at their rates side by
    /// side: [`DeviceRates::gpu_share`] then splits a cold expert between reading in place
    /// and the CPU (`--cold-experts mixed` in a decode graph).
    pub fn reading_in_place(&self) -> DeviceRates {
        let (cpu, in_place) = self.mixed_rates();
        DeviceRates { h2d_gbps: in_place, cpu_expert_gbps: cpu, ..*self }
    }

    /// These rates for copies from page-locked memory.
    pub fn pinned(&self) -> DeviceRates {
        DeviceRates { h2d_gbps: self.h2d_pinned_gbps, ..*self }
    }

    /// Decode's choice under `--cold-experts auto`, the fastest of three for `cold_bytes`
    /// of cold experts a token over `host_layers` layers that keep experts in host memory:
    /// in place reads them over PCIe inside the step's CUDA graph; the CPU's way computes
    /// them at the CPU's rate and pays [`HOST_EXCHANGE_S`] for each such layer (whether or
    /// not a token picks a cold expert there); mixed pays the same exchanges and moves them
    /// at both rates side by side. Ties: in place, then mixed. Never in place or mixed
    /// where the GPU cannot read host pages (rate 0).
    pub fn decode_way(&self, cold_bytes: f64, host_layers: usize) -> DecodeWay {
        self.decode_way_with(cold_bytes, host_layers, true)
    }

    /// [`DeviceRates::decode_way`], mixed left out unless `mixed` (where the host cannot
    /// hold what it needs: [`DeviceRates::mixed_host_bytes`]).
    pub fn decode_way_with(&self, cold_bytes: f64, host_layers: usize, mixed: bool) -> DecodeWay {
        if self.in_place_gbps <= 0.0 {
            return DecodeWay::Cpu;
        }
        let ways = [
            (DecodeWay::InPlace, self.in_place_seconds(cold_bytes)),
            (DecodeWay::Mixed, if mixed { self.decode_mixed_seconds(cold_bytes, host_layers) } else { f64::INFINITY }),
            (DecodeWay::Cpu, self.decode_cpu_seconds(cold_bytes, host_layers)),
        ];
        ways.iter().fold(ways[0], |best, &w| if w.1 < best.1 { w } else { best }).0
    }

    /// [`DeviceRates::decode_way_with`] for `sequences` decoded side by side: above one,
    /// mixed wherever in place would win and mixed is allowed. In place's products wait on
    /// PCIe on every SM while the other sequences' steps wait for SMs; mixed's GPU share
    /// runs on a quarter of them at the greatest priority (H200, S2x32 at 50%, eight
    /// sequences: 1,297.23 tokens/s mixed, 1,018.90 in place; docs/PERF.md).
    pub fn decode_way_for(&self, cold_bytes: f64, host_layers: usize, mixed: bool, sequences: usize) -> DecodeWay {
        match self.decode_way_with(cold_bytes, host_layers, mixed) {
            DecodeWay::InPlace if mixed && sequences > 1 => DecodeWay::Mixed,
            way => way,
        }
    }

    /// Host memory mixed holds for `host_expert_bytes` of cold experts: their page-locked
    /// copy that the GPU reads, and, unless the CPU reads that copy too (`reads_copy`:
    /// [`mixed_reads_copy`]), the file's pages of the CPU's share of each (its fraction at
    /// the side-by-side rates), which must stay in the page cache.
    pub fn mixed_host_bytes(&self, host_expert_bytes: u64, reads_copy: bool) -> u64 {
        if reads_copy {
            return host_expert_bytes;
        }
        let (cpu, in_place) = self.mixed_rates();
        let share = if cpu + in_place > 0.0 { cpu / (cpu + in_place) } else { 1.0 };
        host_expert_bytes + (host_expert_bytes as f64 * share) as u64
    }

    /// The CPU's rate and the in-place rate while both run ([`DeviceRates::mixed_gbps`], or
    /// each alone where not measured).
    pub fn mixed_rates(&self) -> (f64, f64) {
        self.mixed_gbps.unwrap_or((self.cpu_expert_gbps, self.in_place_gbps))
    }

    /// Seconds a decoded token spends with its `cold_bytes` of cold experts shared between
    /// the CPU and in-place reads over `host_layers` layers with experts in host memory.
    pub fn decode_mixed_seconds(&self, cold_bytes: f64, host_layers: usize) -> f64 {
        let (cpu, in_place) = self.mixed_rates();
        host_layers as f64 * HOST_EXCHANGE_S + cold_bytes / ((cpu + in_place) * 1e9)
    }

    /// Cold-expert bytes per decoded token and layer with host experts above which sharing
    /// them with the CPU (mixed) is faster than reading them in place; 0 where the GPU
    /// cannot read in place.
    pub fn decode_mixed_above(&self) -> f64 {
        let (cpu, in_place) = self.mixed_rates();
        if self.in_place_gbps <= 0.0 || in_place <= 0.0 {
            return 0.0;
        }
        let saved_per_byte = 1.0 / (self.in_place_gbps * 1e9) - 1.0 / ((cpu + in_place) * 1e9);
        if saved_per_byte > 0.0 {
            HOST_EXCHANGE_S / saved_per_byte
        } else {
            f64::INFINITY
        }
    }

    /// Seconds a decoded token spends the CPU's way on `cold_bytes` of cold experts over
    /// `host_layers` layers with experts in host memory.
    pub fn decode_cpu_seconds(&self, cold_bytes: f64, host_layers: usize) -> f64 {
        host_layers as f64 * HOST_EXCHANGE_S + cold_bytes / (self.cpu_expert_gbps * 1e9)
    }

    /// Seconds for the GPU's products to read `bytes` of cold experts in place over PCIe
    /// (infinite where the GPU cannot).
    pub fn in_place_seconds(&self, bytes: f64) -> f64 {
        bytes / (self.in_place_gbps * 1e9)
    }

    /// Decode's three ways for `cold_bytes` of cold experts a token over `host_layers`
    /// layers with host experts, in words (what auto weighed; the run and `mxr plan` print
    /// it).
    pub fn decode_comparison(&self, cold_bytes: f64, host_layers: usize) -> String {
        let (cpu, in_place) = self.mixed_rates();
        format!(
            "{:.1} MB of cold experts a token: in place {:.2} ms at {:.1} GB/s, the CPU's way {:.2} ms at {:.1} GB/s, mixed {:.2} ms at {:.1} + {:.1} GB/s, with {host_layers} layer{} exchanging with the host",
            cold_bytes / 1e6,
            self.in_place_seconds(cold_bytes) * 1e3,
            self.in_place_gbps,
            self.decode_cpu_seconds(cold_bytes, host_layers) * 1e3,
            self.cpu_expert_gbps,
            self.decode_mixed_seconds(cold_bytes, host_layers) * 1e3,
            cpu,
            in_place,
            if host_layers == 1 { "" } else { "s" }
        )
    }

    /// `--cold-experts mixed`: of a batch's cold experts, given as (weight bytes, tokens
    /// routed to it), which the CPU computes (true) while the GPU reads the others in
    /// place, side by side. Greedy, largest first: each expert goes to the side that ends
    /// the batch's cold work sooner with it (ties: in place, which needs no upload).
    pub fn split_cold(&self, experts: &[(u64, usize)], flops: f64) -> Vec<bool> {
        let mut order: Vec<usize> = (0..experts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(experts[i].0));
        let (mut cpu, mut gpu) = (0.0f64, 0.0f64);
        let mut on_cpu = vec![false; experts.len()];
        for i in order {
            let (b, m) = experts[i];
            let (c, g) = (cpu + self.cpu_seconds(b, m, flops), gpu + self.in_place_seconds(b as f64));
            if c.max(gpu) < cpu.max(g) {
                cpu = c;
                on_cpu[i] = true;
            } else {
                gpu = g;
            }
        }
        on_cpu
    }

    pub fn choose(&self, bytes: u64, tokens: usize, flops: f64) -> ColdChoice {
        if self.copy_seconds(bytes) < self.cpu_seconds(bytes, tokens, flops) {
            ColdChoice::CopyToGpu
        } else {
            ColdChoice::Cpu
        }
    }

    /// With copies straight from page-locked memory, the GPU and the CPU can share one cold
    /// expert: the GPU copies and computes a share f of its hidden units while the CPU
    /// computes the rest, side by side. Both end together at f = cpu / (copy + cpu), in
    /// copy * cpu / (copy + cpu) seconds. Returns f (near 1: copy it all; near 0: the CPU).
    pub fn gpu_share(&self, bytes: u64, tokens: usize, flops: f64) -> f64 {
        let (copy, cpu) = (self.copy_seconds(bytes), self.cpu_seconds(bytes, tokens, flops));
        if copy + cpu > 0.0 {
            cpu / (copy + cpu)
        } else {
            1.0
        }
    }

    /// [`DeviceRates::gpu_share`] of an expert's `h` hidden units, in whole `unit`s (the
    /// GPU's part of the down projection must be whole blocks of its type): 0 means all on
    /// the CPU, h all copied. Rounded to the nearest unit, halves to the CPU (as
    /// [`DeviceRates::choose`] copies only what is strictly faster to copy).
    pub fn gpu_hidden_units(&self, bytes: u64, tokens: usize, flops: f64, h: usize, unit: usize) -> usize {
        let unit = unit.max(1);
        let units = (self.gpu_share(bytes, tokens, flops) * (h / unit) as f64 - 0.5).ceil().max(0.0) as usize;
        (units * unit).min(h)
    }

    /// The fewest tokens for which copying an expert beats computing it on the CPU.
    pub fn copy_threshold(&self, bytes: u64, flops: f64) -> Option<usize> {
        (1..=1 << 20).find(|&m| self.choose(bytes, m, flops) == ColdChoice::CopyToGpu)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "host_read_gbps": self.host_read_gbps,
            "cpu_expert_gbps": self.cpu_expert_gbps,
            "cpu_gflops": self.cpu_gflops,
            "h2d_gbps": self.h2d_gbps,
            "h2d_pinned_gbps": self.h2d_pinned_gbps,
            "in_place_gbps": self.in_place_gbps,
            "mixed_cpu_gbps": self.mixed_gbps.map(|m| m.0),
            "mixed_in_place_gbps": self.mixed_gbps.map(|m| m.1),
        })
    }

    pub fn from_json(j: &Value) -> Result<DeviceRates, ModelError> {
        let get = |k: &str| -> Result<f64, ModelError> {
            j.get(k)
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| ModelError::Input(format!("device rates: `{k}` missing or not a positive number")))
        };
        let h2d_pinned_gbps = get("h2d_pinned_gbps")?;
        Ok(DeviceRates {
            host_read_gbps: get("host_read_gbps")?,
            cpu_expert_gbps: get("cpu_expert_gbps")?,
            cpu_gflops: get("cpu_gflops")?,
            h2d_gbps: get("h2d_gbps")?,
            h2d_pinned_gbps,
            // files saved before the rate existed: the same PCIe link as pinned copies; 0:
            // the GPU cannot read host pages in place
            in_place_gbps: match j.get("in_place_gbps") {
                None => h2d_pinned_gbps,
                Some(v) => v
                    .as_f64()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| ModelError::Input("device rates: `in_place_gbps` not a number >= 0".into()))?,
            },
            // files saved before they were measured (or where they were not): null
            mixed_gbps: match (j.get("mixed_cpu_gbps").filter(|v| !v.is_null()), j.get("mixed_in_place_gbps").filter(|v| !v.is_null())) {
                (None, None) => None,
                _ => Some((get("mixed_cpu_gbps")?, get("mixed_in_place_gbps")?)),
            },
        })
    }

    /// Where `mxr bench --calibrate-devices` keeps the rates: $MXR_CACHE_DIR or
    /// ~/.cache/mxr, file devices.json.
    pub fn cache_path() -> Option<PathBuf> {
        let dir = match std::env::var_os("MXR_CACHE_DIR") {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/mxr"),
        };
        Some(dir.join("devices.json"))
    }

    /// The rates run/chat/bench/plan use: those saved by `mxr bench --calibrate-devices`
    /// (and the file's path), or the defaults (None) where no file exists.
    pub fn saved() -> Result<(DeviceRates, Option<PathBuf>), ModelError> {
        let path = DeviceRates::cache_path();
        Ok(match path.as_ref().map(|f| DeviceRates::load(f)).transpose()?.flatten() {
            Some(r) => (r, path),
            None => (DeviceRates::DEFAULT, None),
        })
    }

    /// The calibrated rates, if a readable file exists (a bad file is an error).
    pub fn load(path: &Path) -> Result<Option<DeviceRates>, ModelError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ModelError::Input(format!("{}: {e}", path.display()))),
        };
        let j: Value = serde_json::from_str(&text).map_err(|e| ModelError::Input(format!("{}: not JSON: {e}", path.display())))?;
        DeviceRates::from_json(&j).map(Some).map_err(|e| ModelError::Input(format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_expert_splits_where_both_sides_end_together() {
        let flops = 2.0 * 3.0 * 6144.0 * 9216.0;
        // equal streaming rates: half each, for one token
        let r = DeviceRates { h2d_gbps: 20.0, cpu_expert_gbps: 20.0, cpu_gflops: 1e6, ..DeviceRates::DEFAULT };
        assert!((r.gpu_share(BYTES, 1, flops) - 0.5).abs() < 1e-12);
        // a PCIe link 2.2x the CPU's rate takes 2.2 / 3.2 of it
        let r = DeviceRates { h2d_gbps: 55.0, cpu_expert_gbps: 25.0, cpu_gflops: 1e6, ..DeviceRates::DEFAULT };
        let f = r.gpu_share(BYTES, 1, flops);
        assert!((f - 55.0 / 80.0).abs() < 1e-12, "{f}");
        assert!((f * r.copy_seconds(BYTES) - (1.0 - f) * r.cpu_seconds(BYTES, 1, flops)).abs() < 1e-12);
        // in whole units: 55/80 of 36 blocks of 256 is 24.75, so 25 blocks
        assert_eq!(r.gpu_hidden_units(BYTES, 1, flops, 9216, 256), 25 * 256);
        assert_eq!(r.gpu_hidden_units(BYTES, 1, flops, 256, 256), 256, "one block: copied whole");
        // a tie (half of one unit) stays on the CPU, as choose() keeps it
        let tie = DeviceRates { h2d_gbps: 20.0, cpu_expert_gbps: 20.0, cpu_gflops: 1e6, ..DeviceRates::DEFAULT };
        assert_eq!(tie.gpu_hidden_units(BYTES, 1, flops, 256, 256), 0);
        assert_eq!(tie.choose(BYTES, 1, flops), ColdChoice::Cpu);
        assert_eq!(tie.gpu_hidden_units(BYTES, 1, flops, 9216, 256), 18 * 256);
        let slow_link = DeviceRates { h2d_gbps: 0.1, ..r };
        assert_eq!(slow_link.gpu_hidden_units(BYTES, 1, flops, 9216, 256), 0, "all on the CPU");
        // many tokens make the CPU's share arithmetic-bound: the GPU takes nearly all
        let r = DeviceRates::DEFAULT;
        assert!(r.gpu_share(BYTES, 4096, flops) > 0.99);
        assert_eq!(r.gpu_hidden_units(BYTES, 4096, flops, 9216, 256), 9216);
    }

    // One real expert projection at q4_k: 9216 x 6144 weights, 4.5 bits each.
    const BYTES: u64 = 9216 * 6144 * 9 / 16;
    const FLOPS: f64 = 2.0 * 9216.0 * 6144.0;

    #[test]
    fn decode_stays_on_the_cpu_and_long_batches_copy() {
        let r = DeviceRates {
            host_read_gbps: 50.0,
            cpu_expert_gbps: 40.0,
            cpu_gflops: 400.0,
            h2d_gbps: 20.0,
            h2d_pinned_gbps: 50.0,
            in_place_gbps: 45.0,
            mixed_gbps: None,
        };
        // streaming 31.9 MB: 0.8 ms on the CPU against 1.6 ms over PCIe
        assert_eq!(r.choose(BYTES, 1, FLOPS), ColdChoice::Cpu);
        assert_eq!(r.choose(BYTES, 2, FLOPS), ColdChoice::Cpu);
        // 113 MFLOP per token at 400 GFLOP/s is 0.28 ms: from 6 tokens the CPU needs > 1.6 ms
        let t = r.copy_threshold(BYTES, FLOPS).unwrap();
        assert_eq!(t, 6, "copy from {t} tokens");
        assert_eq!(r.choose(BYTES, 512, FLOPS), ColdChoice::CopyToGpu);
        // a CPU that streams slower than PCIe copies even for one token
        let slow = DeviceRates { cpu_expert_gbps: 10.0, ..r };
        assert_eq!(slow.choose(BYTES, 1, FLOPS), ColdChoice::CopyToGpu);
        // from page-locked memory (50 GB/s: 0.64 ms) the copy beats the CPU's 0.8 ms at once
        assert_eq!(r.pinned().h2d_gbps, 50.0);
        assert_eq!(r.pinned().copy_threshold(BYTES, FLOPS), Some(1));
    }

    #[test]
    fn decode_takes_the_fastest_of_in_place_mixed_and_the_cpus_way() {
        const MB: f64 = 1e6;
        // the H200 machine's rates (fifteenth session): in place 49 GB/s, the CPU 82 alone,
        // side by side 48 + 70
        let r = DeviceRates { cpu_expert_gbps: 82.0, in_place_gbps: 49.0, mixed_gbps: Some((70.0, 48.0)), ..DeviceRates::DEFAULT };
        assert_eq!(r.decode_way(0.0, 0), DecodeWay::InPlace);
        // S2x32 at 25%: 49 MB over 2 layers, in place 1.00 ms, the CPU's way 0.70, mixed 0.52
        assert_eq!(r.decode_way(49.0 * MB, 2), DecodeWay::Mixed);
        assert!((r.decode_mixed_seconds(118.0 * MB, 2) - (0.1e-3 + 1e-3)).abs() < 1e-12);
        assert!((r.decode_cpu_seconds(82.0 * MB, 2) - (0.1e-3 + 1e-3)).abs() < 1e-12);
        assert!((r.in_place_seconds(98.0 * MB) - 2e-3).abs() < 1e-12);
        // at 50%: 4.5 MB stays in place (0.09 ms against 0.14 ms with the exchanges)
        assert_eq!(r.decode_way(4.5 * MB, 2), DecodeWay::InPlace);
        // ... for one sequence; several side by side share it (where mixed may run)
        assert_eq!(r.decode_way_for(4.5 * MB, 2, true, 1), DecodeWay::InPlace);
        assert_eq!(r.decode_way_for(4.5 * MB, 2, true, 8), DecodeWay::Mixed);
        assert_eq!(r.decode_way_for(4.5 * MB, 2, false, 8), DecodeWay::InPlace);
        assert_eq!(r.decode_way_for(6_000.0 * MB, 80, false, 8), DecodeWay::Cpu);
        // the break-even: per byte mixed saves 1/49 - 1/118 ns, 0.05 ms a layer is worth
        // 4.19 MB of cold experts a token per layer
        let above = r.decode_mixed_above();
        assert!((above - 0.05e-3 / (1.0 / 49e9 - 1.0 / 118e9)).abs() < 1.0, "{above}");
        assert_eq!(r.decode_way(2.0 * above * 0.99, 2), DecodeWay::InPlace);
        assert_eq!(r.decode_way(2.0 * above * 1.01, 2), DecodeWay::Mixed);
        assert_eq!(r.decode_way(6_000.0 * MB, 80), DecodeWay::Mixed, "the real model with half its experts cold");
        let words = r.decode_comparison(118.0 * MB, 2);
        assert!(
            words.contains("118.0 MB of cold experts a token: in place 2.41 ms at 49.0 GB/s, the CPU's way 1.54 ms at 82.0 GB/s, mixed 1.10 ms at 70.0 + 48.0 GB/s, with 2 layers"),
            "{words}"
        );
        // not measured side by side: each at its rate alone
        let alone = DeviceRates { mixed_gbps: None, ..r };
        assert_eq!(alone.mixed_rates(), (82.0, 49.0));
        // a host without room for mixed's two forms of the cold experts: the faster of the
        // others (118 GB of cold experts side by side at 70 and 48 GB/s: 70 GB of file pages)
        assert_eq!(r.decode_way_with(6_000.0 * MB, 80, false), DecodeWay::Cpu);
        assert_eq!(r.mixed_host_bytes(118_000_000_000, false), 118_000_000_000 + 70_000_000_000);
        // ... which the CPU does not read where it reads the page-locked copy
        assert_eq!(r.mixed_host_bytes(118_000_000_000, true), 118_000_000_000);
        assert!(mixed_reads_copy([QType::Q4K, QType::F32, QType::BF16]) && !mixed_reads_copy([QType::Q4K, QType::Q8_0]));
        // side by side slower than the CPU alone: the CPU's way
        let contended = DeviceRates { mixed_gbps: Some((40.0, 10.0)), ..r };
        assert_eq!(contended.decode_way(120.0 * MB, 2), DecodeWay::Cpu);
        // measured as unavailable (0) and saved: the CPU's way, whatever the bytes
        let none = DeviceRates { in_place_gbps: 0.0, mixed_gbps: None, ..r };
        assert_eq!(none.decode_way(0.0, 0), DecodeWay::Cpu);
        assert_eq!(none.decode_mixed_above(), 0.0);
        assert_eq!(DeviceRates::from_json(&none.to_json()).unwrap(), none);
        assert_eq!(DeviceRates::from_json(&r.to_json()).unwrap(), r);
        let stalled = DeviceRates { cpu_expert_gbps: 0.0, ..none };
        assert!(DeviceRates::from_json(&stalled.to_json()).unwrap_err().to_string().contains("cpu_expert_gbps"));
        // a file with half of mixed's pair is an error
        let mut j = r.to_json();
        j["mixed_in_place_gbps"] = serde_json::Value::Null;
        assert!(DeviceRates::from_json(&j).unwrap_err().to_string().contains("mixed_in_place_gbps"));
    }

    #[test]
    fn mixed_shares_each_cold_expert_at_the_side_by_side_rates() {
        let flops = 2.0 * 3.0 * 6144.0 * 9216.0;
        let b = 3 * BYTES;
        // side by side 70 and 48 GB/s: the GPU's share is 48 / 118 = 0.41, 15 of 36 blocks
        let r = DeviceRates { cpu_expert_gbps: 82.0, in_place_gbps: 49.0, mixed_gbps: Some((70.0, 48.0)), ..DeviceRates::DEFAULT };
        let r = r.reading_in_place();
        assert!((r.gpu_share(b, 1, flops) - 48.0 / 118.0).abs() < 1e-9);
        assert_eq!(r.gpu_hidden_units(b, 1, flops, 9216, 256), 15 * 256);
    }

    #[test]
    fn mixed_cold_experts_split_between_the_cpu_and_in_place_reads() {
        let flops = 2.0 * 3.0 * 6144.0 * 9216.0;
        let b = 3 * BYTES;
        // the H200 host: in place 49 GB/s, the CPU 46 GB/s for one token
        let r = DeviceRates { cpu_expert_gbps: 46.0, in_place_gbps: 49.0, cpu_gflops: 400.0, ..DeviceRates::DEFAULT };
        assert_eq!(r.split_cold(&[], flops), Vec::<bool>::new());
        assert_eq!(r.split_cold(&[(b, 1)], flops), [false], "one: the faster side, in place");
        assert_eq!(r.split_cold(&[(b, 1), (b, 1)], flops), [false, true], "two: one each");
        let four = r.split_cold(&[(b, 1); 4], flops);
        assert_eq!(four.iter().filter(|&&c| c).count(), 2);
        // a prefill's expert with many tokens is arithmetic on the CPU: read in place
        assert_eq!(r.split_cold(&[(b, 512), (b, 1)], flops), [false, true]);
        // a GPU that cannot read in place leaves everything to the CPU
        let none = DeviceRates { in_place_gbps: 0.0, ..r };
        assert_eq!(none.split_cold(&[(b, 1), (b, 1)], flops), [true, true]);
        // a much faster link takes more of them: 3 of 4 at 3x the CPU's rate
        let fast = DeviceRates { in_place_gbps: 138.0, ..r };
        assert_eq!(fast.split_cold(&[(b, 1); 4], flops).iter().filter(|&&c| !c).count(), 3);
    }

    #[test]
    fn rates_round_trip_through_json_and_bad_files_are_errors() {
        let r = DeviceRates::DEFAULT;
        assert_eq!(DeviceRates::from_json(&r.to_json()).unwrap(), r);
        let mut j = r.to_json();
        j["h2d_gbps"] = json!(-1.0);
        assert!(DeviceRates::from_json(&j).unwrap_err().to_string().contains("h2d_gbps"));
        let dir = std::env::temp_dir().join(format!("mxr-rates-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(DeviceRates::load(&dir.join("none.json")).unwrap(), None);
        std::fs::write(dir.join("bad.json"), "{").unwrap();
        assert!(DeviceRates::load(&dir.join("bad.json")).unwrap_err().to_string().contains("not JSON"));
        std::fs::write(dir.join("good.json"), r.to_json().to_string()).unwrap();
        assert_eq!(DeviceRates::load(&dir.join("good.json")).unwrap(), Some(r));
        // a file from before the in-place rate: that rate is the pinned copies'
        let mut old = DeviceRates { h2d_pinned_gbps: 33.0, in_place_gbps: 7.0, ..r }.to_json();
        old.as_object_mut().unwrap().remove("in_place_gbps");
        assert_eq!(DeviceRates::from_json(&old).unwrap().in_place_gbps, 33.0);
        j = r.to_json();
        j["in_place_gbps"] = json!("fast");
        assert!(DeviceRates::from_json(&j).unwrap_err().to_string().contains("in_place_gbps"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
