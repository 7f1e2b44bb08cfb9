//! Expert offload on the GPU (issue 7), end to end: every placement and every way of
//! computing cold experts (the CPU's way, read in place, mixed; batches and decode steps
//! in the CUDA graph) against all experts on the GPU, and experts moved between requests.
//! Needs a GPU: ignored by `cargo test`; scripts/gpu-check.sh runs it with --ignored on
//! the GPU machine and tabulates the `CHECK` lines.

use mxr_e2e::gpu::{argmax, converted, gpu_model, greedy_steps, split_greedy_steps, top1_same};
use mxr_e2e::repo_root;
use mxr_kernels::cpu::Threads;
use mxr_kernels::cuda::{Gpu, KvType};
use mxr_models::forward::{forward, Logits};
use mxr_models::gpu::split::{SplitModel, SplitSession};
use mxr_models::gpu::{GpuModel, GpuSession};
use mxr_models::placement::Sizes;
use mxr_models::{Model, Session};
use mxr_quant::reference::stats::diff;
use mxr_quant::QType;

/// The sizes of `m` as these tests plan them (64 tokens of context), and the GPU budget
/// that holds everything but the experts, and 1/`div` of the experts.
fn budget_for(m: &Model, div: u64) -> (Sizes, u64) {
    let (sizes, c) = (Sizes::of(m, 64, 4.0, 0), &m.config);
    let per_layer: u64 = sizes.expert.iter().sum::<u64>() / c.n_layers as u64;
    let budget = sizes.non_expert + sizes.state + per_layer * (c.n_experts as u64 * c.n_layers as u64) / div;
    (sizes, budget)
}

/// Expert offload (issue 7): with experts in host memory (computed on the CPU from the
/// mapped file) the logits stay as close to the all-GPU placement as the CPU model is: for Q8_0 the CPU's ggml kernels
/// quantize activations as the GPU's matrix-vector kernels do, so decode agrees closely;
/// prefill of more than 8 tokens mixes bf16 (GPU experts) and int8 activations (CPU experts).
#[test]
#[ignore = "needs a GPU"]
fn every_expert_placement_gives_the_same_logits() {
    use mxr_models::offload_cost::DeviceRates;
    use mxr_models::placement::{plan, Policy};
    // Q8_0: cold experts copied through a host buffer (repacked); Q4_K: copied straight
    // from the page-locked mapping on the side stream
    // F32: a cold expert can also be shared (hidden units in blocks of 32 of nano's 256)
    for q in [QType::Q8_0, QType::Q4K, QType::F32] {
        let m = converted(&repo_root().join("nano/checkpoint"), "nano-offload", q);
        let c = &m.config;
        let prompt: Vec<u32> =
            mxr_e2e::tokenize(&repo_root().join("nano/checkpoint/tokenizer.json"), "ROMEO:\nWhat light through yonder window breaks?");
        let run = |g: &GpuModel| -> Vec<f32> {
            let mut s = GpuSession::new(g, 64).unwrap();
            let mut out = Vec::new();
            for ch in prompt.chunks(4) {
                out.extend(g.forward_on(Some(&m), &mut s, ch, Logits::All).unwrap());
            }
            out
        };
        let all = run(&gpu_model(&m));
        // The CPU's experts quantize activations as ggml does for the type (q8_0 blocks of
        // 32 for Q8_0, q8_K blocks of 256 for Q4_K), the GPU's in int8 blocks of 32. So the
        // budget is the larger of 2e-2 and 1.25x the whole CPU model's distance from the
        // GPU's: offload may not be further from the GPU than the CPU model is.
        let mut cs = Session::new(c);
        let cpu: Vec<f32> = prompt.chunks(4).flat_map(|ch| forward(&m, &mut cs, ch, Logits::All, Threads::all()).unwrap()).collect();
        let cpu_gap = diff(&cpu, &all).max_abs;
        let budget = (1.25 * cpu_gap).max(2e-2);
        let (sizes, half) = budget_for(&m, 2);
        // rates under which the cost model copies every cold expert to the GPU for each batch
        let copy_all = DeviceRates { h2d_gbps: 1e9, h2d_pinned_gbps: 1e9, ..DeviceRates::DEFAULT };
        // copies and the CPU at one rate: a page-locked cold expert is shared half and half
        let share = DeviceRates { h2d_gbps: 20.0, h2d_pinned_gbps: 20.0, cpu_expert_gbps: 20.0, cpu_gflops: 1e9, ..DeviceRates::DEFAULT };
        for (name, policy, rates) in [
            ("--cpu-moe", Policy::CpuMoe, DeviceRates::DEFAULT),
            ("--n-cpu-moe 3", Policy::NCpuMoe(3), DeviceRates::DEFAULT),
            ("half the experts", Policy::Budget(half), DeviceRates::DEFAULT),
            ("half, cold experts copied per batch", Policy::Budget(half), copy_all),
            ("half, cold experts shared by GPU and CPU", Policy::Budget(half), share),
        ] {
            let p = plan(&sizes, c.n_experts, None, policy).unwrap();
            let mut g = GpuModel::upload_placed(&m, Gpu::open(0).unwrap(), Some(&p)).unwrap();
            g.kv_type = KvType::F32;
            g.rates = rates;
            g.share_cold = rates == share;
            let got = run(&g);
            let d = diff(&got, &all);
            let top1 = top1_same(&got, &all, c.vocab_size);
            // the host's experts are page-locked (or the driver said why not)
            let pinned = g.pinned_bytes() > 0;
            let ok = d.max_abs <= budget && top1.0 == top1.1 && (pinned || g.pin_note.is_some());
            println!(
                "CHECK expert offload vs all on GPU | nano {q}, {name} ({} of {} experts on GPU, {}) | max abs {:.2e}, top-1 {}/{} | {budget:.1e} (CPU model {cpu_gap:.2e}) | {}",
                p.experts_on_gpu(),
                c.n_experts * c.n_layers,
                g.pin_note.clone().unwrap_or_else(|| format!("{} KiB page-locked", g.pinned_bytes() / 1024)),
                d.max_abs,
                top1.0,
                top1.1,
                if ok { "ok" } else { "FAIL" }
            );
            assert!(ok, "{name}: {d}");
            let count = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let (copied, shared) = (count(&g.copied_experts), count(&g.shared_experts));
            if rates == share {
                // nano's hidden size is one Q4_K block: whole experts only (and a tie stays
                // on the CPU); Q8_0 is repacked, so not copied straight from the mapping and
                // never shared
                assert_eq!(shared > 0, q == QType::F32 && g.pinned_bytes() > 0, "{name}: {shared} experts shared");
            } else if rates == copy_all {
                assert!(copied > 0 && shared == 0, "{name}: {copied} experts copied, {shared} shared");
            } else {
                // sharing is off but for the `share` case; the default rates keep nano's
                // small quantized experts on the CPU
                assert!(shared == 0 && (q == QType::F32 || copied == 0), "{name}: {copied} experts copied, {shared} shared");
            }
        }
    }
}

/// Issue 7, the CPU's experts inside the decode graph (offload_graph.rs): decoded tokens
/// with experts in host memory (`--cpu-moe`, and a quarter of the experts on the GPU) give
/// the logits of the same steps launched kernel by kernel (`MXR_OFFLOAD_GRAPH=0`) bit for
/// bit, since the same GPU products and the same CPU kernels see the same inputs; the host
/// worker counts the experts it computes, as many as the steps launched kernel by kernel.
/// A layer split in two parts decodes the same logits, each part's graph posting to the
/// host worker. The CPU's products on 3 threads (`--threads 3`) give the same logits too.
#[test]
#[ignore = "needs a GPU"]
fn cpu_experts_in_the_decode_graph_give_the_kernel_by_kernel_logits() {
    use mxr_models::gpu::ColdExperts;
    use mxr_models::placement::{plan, Policy};
    use std::sync::atomic::Ordering::Relaxed;
    let mut ok = true;
    for q in [QType::Q8_0, QType::Q4K] {
        let m = converted(&repo_root().join("nano/checkpoint"), "nano-offload-graph", q);
        let c = &m.config;
        let prompt: Vec<u32> = mxr_e2e::tokenize(&repo_root().join("nano/checkpoint/tokenizer.json"), "ROMEO:\nWhat light");
        let (sizes, quarter) = budget_for(&m, 4);
        for (name, policy) in [("--cpu-moe", Policy::CpuMoe), ("a quarter of the experts", Policy::Budget(quarter))] {
            let p = plan(&sizes, c.n_experts, None, policy).unwrap();
            // 8 greedy steps after the prompt: their logits, and the experts the CPU computed
            // (threads: the CPU's threads for cold experts, `--threads`; None: all cores)
            let decode = |graph: bool, threads: Option<usize>| -> (Vec<f32>, u64, u64) {
                let mut g = GpuModel::upload_part_with(&m, Gpu::open(0).unwrap(), Some(&p), 0..c.n_layers, ColdExperts::Host).unwrap();
                g.kv_type = KvType::F32;
                g.offload_graph = graph;
                if let Some(t) = threads {
                    g.cpu_threads = mxr_kernels::cpu::Threads(t);
                }
                let mut s = GpuSession::new(&g, 64).unwrap();
                let next = argmax(&g.forward_on(Some(&m), &mut s, &prompt, Logits::Last).unwrap()) as u32;
                // (the prompt's batch may copy experts to the GPU; decode steps compute them)
                let before = (g.cpu_experts.load(Relaxed), g.copied_experts.load(Relaxed));
                let out = greedy_steps(&g, &m, &mut s, next, 8);
                (out, g.cpu_experts.load(Relaxed) - before.0, g.copied_experts.load(Relaxed) - before.1)
            };
            let (a, na, _) = decode(true, None);
            let (b, nb, copied) = decode(false, None);
            // the CPU's products split over 3 threads: the same values (each row is computed
            // by one thread, whatever their number)
            let (t3, n3, _) = decode(true, Some(3));
            let d = diff(&a, &b);
            let this = a == b && na == nb && na > 0 && copied == 0 && t3 == a && n3 == na;
            println!(
                "CHECK CPU experts in the decode graph | nano {q}, {name}, 8 steps, {na} experts on the CPU from the graph ({nb} kernel by kernel; with 3 CPU threads the same: {}) | max abs {:.2e} | exact | {}",
                t3 == a && n3 == na,
                d.max_abs,
                if this { "ok" } else { "FAIL" }
            );
            ok &= this;
            // the same steps over two parts of a layer split (one GPU opened twice), each
            // part's graph posting to its own GPU's host worker
            let half = c.n_layers / 2;
            let gpus = vec![Gpu::open(0).unwrap(), Gpu::open(0).unwrap()];
            let mut sm =
                SplitModel::upload(&m, gpus, &[0..half, half..c.n_layers], &[Some(p.clone()), Some(p.clone())], ColdExperts::Host).unwrap();
            sm.parts.iter_mut().for_each(|g| g.kv_type = KvType::F32);
            let mut s = SplitSession::new(&sm, 64).unwrap();
            let next = argmax(&sm.forward(Some(&m), &mut s, &prompt, Logits::Last).unwrap()) as u32;
            let before: u64 = sm.parts.iter().map(|g| g.cpu_experts.load(Relaxed)).sum();
            let split = split_greedy_steps(&sm, &m, &mut s, next, 8);
            let ns = sm.parts.iter().map(|g| g.cpu_experts.load(Relaxed)).sum::<u64>() - before;
            let d = diff(&split, &a);
            let this = split == a && ns == na;
            println!(
                "CHECK CPU experts in the decode graph | nano {q}, {name}, layer split in two, 8 steps, {ns} experts on the CPU | max abs {:.2e} from one GPU | exact | {}",
                d.max_abs,
                if this { "ok" } else { "FAIL" }
            );
            ok &= this;
        }
    }
    assert!(ok);
}

/// Issue 7, `--cold-experts mixed` in the decode graph: the GPU reads each cold choice's
/// hidden units 0..h1 in place (products over part of each expert: gate and up rows, the
/// down projection's columns) while the host worker computes the rest, and the two parts
/// add up. h1 follows the rates: even rates split nano's Q8_0 and F32 experts in half
/// (blocks of 32) and give Q4_K's single block of 256 to the CPU; in place three times the
/// CPU's rate gives the GPU three quarters, and Q4_K's whole block. Over 8 greedy tokens
/// the logits are no further from all on the GPU than the larger of 1.25x the CPU's way's
/// (which computes every cold choice on the CPU) and bf16's rounding of the largest logit
/// (2^-8 of it: issue 7's tolerance; summed in another order, a near-tie between two
/// experts can route a later token differently), with the same top-1, and with every
/// expert cold each of
/// the 2 choices of each layer and token is counted once: shared, on the CPU (h1 = 0) or
/// read in place (h1 = h). A layer split in two parts (one GPU opened twice), each part's
/// graph sharing its layers' cold experts with its own host worker, decodes the same logits
/// bit for bit.
#[test]
#[ignore = "needs a GPU"]
fn mixed_cold_experts_in_the_decode_graph_stay_close_to_all_on_the_gpu() {
    use mxr_models::gpu::ColdExperts;
    use mxr_models::offload_cost::DeviceRates;
    use mxr_models::placement::{plan, Policy};
    use std::sync::atomic::Ordering::Relaxed;
    let mut ok = true;
    for q in [QType::Q8_0, QType::Q4K, QType::F32] {
        let m = converted(&repo_root().join("nano/checkpoint"), "nano-offload-graph", q);
        let c = &m.config;
        let prompt: Vec<u32> = mxr_e2e::tokenize(&repo_root().join("nano/checkpoint/tokenizer.json"), "ROMEO:\nWhat light");
        // 8 greedy steps after the prompt: their logits, and the cold choices during them
        // [on the CPU, read in place, shared]
        let decode = |g: &GpuModel| -> (Vec<f32>, [u64; 3]) {
            let mut s = GpuSession::new(g, 64).unwrap();
            let next = argmax(&g.forward_on(Some(&m), &mut s, &prompt, Logits::Last).unwrap()) as u32;
            let counters = [&g.cpu_experts, &g.in_place_experts, &g.shared_experts];
            let before = counters.map(|a| a.load(Relaxed));
            let out = greedy_steps(g, &m, &mut s, next, 8);
            let mut used = [0u64; 3];
            for (u, (a, b)) in used.iter_mut().zip(counters.iter().zip(before)) {
                *u = a.load(Relaxed) - b;
            }
            (out, used)
        };
        let all_gpu = gpu_model(&m);
        let (want, _) = decode(&all_gpu);
        drop(all_gpu);
        let (sizes, quarter) = budget_for(&m, 4);
        for (name, policy) in [("--cpu-moe", Policy::CpuMoe), ("a quarter of the experts", Policy::Budget(quarter))] {
            let p = plan(&sizes, c.n_experts, None, policy).unwrap();
            let rates = |in_place_gbps: f64| DeviceRates { cpu_expert_gbps: 20.0, in_place_gbps, ..DeviceRates::DEFAULT };
            let upload = |cold, in_place_gbps: f64| {
                let mut g = GpuModel::upload_part_with(&m, Gpu::open(0).unwrap(), Some(&p), 0..c.n_layers, cold).unwrap();
                g.kv_type = KvType::F32;
                g.rates = rates(in_place_gbps);
                g
            };
            // the same over two parts of a layer split
            let split = |in_place_gbps: f64| -> Vec<f32> {
                let (half, gpus) = (c.n_layers / 2, vec![Gpu::open(0).unwrap(), Gpu::open(0).unwrap()]);
                let ps = [Some(p.clone()), Some(p.clone())];
                let mut sm = SplitModel::upload(&m, gpus, &[0..half, half..c.n_layers], &ps, ColdExperts::Mixed).unwrap();
                sm.parts.iter_mut().for_each(|g| {
                    g.kv_type = KvType::F32;
                    g.rates = rates(in_place_gbps);
                });
                let mut s = SplitSession::new(&sm, 64).unwrap();
                let next = argmax(&sm.forward(Some(&m), &mut s, &prompt, Logits::Last).unwrap()) as u32;
                split_greedy_steps(&sm, &m, &mut s, next, 8)
            };
            // the CPU's way (every cold choice on the CPU) sets the budget: the CPU's
            // kernels quantize activations as ggml does (q8_K blocks of 256 for Q4_K), and
            // over 8 tokens that compounds (1.63e-1 for Q4_K, a quarter of the experts, on
            // the H200)
            let (host_way, _) = decode(&upload(ColdExperts::Host, 20.0));
            let bf16 = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 256.0;
            let budget = (1.25 * diff(&host_way, &want).max_abs).max(bf16).max(1e-2);
            for (ratio, in_place_gbps) in [("even rates", 20.0), ("in place 3x", 60.0)] {
                let h = c.hidden_dim;
                let unit = if q == QType::Q4K { 256 } else { 32 };
                let gpu_units = ((if in_place_gbps > 20.0 { 0.75 } else { 0.5 } * (h / unit) as f64 - 0.5).ceil() as usize * unit).min(h);
                let mixed = upload(ColdExperts::Mixed, in_place_gbps);
                // the CPU reads cold experts from the page-locked copy where the type keeps
                // the file's layout (Q8_0 is repacked for the GPU: from the file)
                let reads_pages = mixed.cpu_reads_host_pages();
                let pages_ok = reads_pages == (q != QType::Q8_0);
                let (got, [cpu, read, shared]) = decode(&mixed);
                drop(mixed);
                let d = diff(&got, &want);
                let first = diff(&got[..c.vocab_size], &want[..c.vocab_size]).max_abs;
                let t = top1_same(&got, &want, c.vocab_size);
                let all_cold = 2 * 8 * c.n_layers as u64;
                let expected = match gpu_units {
                    0 => [all_cold, 0, 0],
                    g if g == h => [0, all_cold, 0],
                    _ => [0, 0, all_cold],
                };
                let counts_ok = if p.experts_on_gpu() == 0 {
                    [cpu, read, shared] == expected
                } else {
                    (0..3).all(|i| (expected[i] > 0) == ([cpu, read, shared][i] > 0))
                };
                // (the first step's distance is printed, not judged: the prompt's batch
                // splits cold experts by whole ones, with the CPU's activations)
                let split_same = split(in_place_gbps) == got;
                let this = d.max_abs <= budget && t.0 == t.1 && counts_ok && split_same && pages_ok;
                println!(
                    "CHECK mixed cold experts in the decode graph | nano {q}, {name}, {ratio}: GPU units 0..{gpu_units} of {h}, 8 steps, cold choices {cpu} on the CPU, {read} read in place, {shared} shared, the CPU reads the page-locked copy: {reads_pages} | max abs {:.2e} (first step {first:.2e}), top-1 {}/{}, layer split the same bits {split_same} | {budget:.2e} | {}",
                    d.max_abs,
                    t.0,
                    t.1,
                    if this { "ok" } else { "FAIL" }
                );
                ok &= this;
            }
        }
    }
    assert!(ok);
}

/// Issue 7, cold experts read in place (`ColdExperts::InPlace`, `--cold-experts in-place`):
/// the same kernels read the same bytes, some from host pages, so the logits are the
/// all-GPU model's bit for bit: prefill in chunks of 4 (the matrix-vector path) and of 24
/// (tensor-core products on weights dequantized from host pages), then decode steps in the
/// captured graph; with every expert in host memory, and with half of them; and half of
/// them split over two parts of a layer split (one GPU opened twice).
#[test]
#[ignore = "needs a GPU"]
fn cold_experts_read_in_place_give_the_all_gpu_logits() {
    use mxr_models::gpu::ColdExperts;
    use mxr_models::placement::{plan, Policy};
    let mut ok = true;
    for q in [QType::Q8_0, QType::Q4K] {
        let m = converted(&repo_root().join("nano/checkpoint"), "nano-in-place", q);
        let c = &m.config;
        let prompt: Vec<u32> =
            mxr_e2e::tokenize(&repo_root().join("nano/checkpoint/tokenizer.json"), "ROMEO:\nWhat light through yonder window breaks?");
        let run = |g: &GpuModel, chunk: usize| -> Vec<f32> {
            let mut s = GpuSession::new(g, 64).unwrap();
            let mut out = Vec::new();
            for ch in prompt.chunks(chunk) {
                out.extend(g.forward(&mut s, ch, Logits::All).unwrap());
            }
            let mut next = argmax(&out[out.len() - c.vocab_size..]) as u32;
            for _ in 0..6 {
                let l = g.forward(&mut s, &[next], Logits::Last).unwrap();
                next = argmax(&l) as u32;
                out.extend(l);
            }
            out
        };
        let all = gpu_model(&m);
        let want = [run(&all, 4), run(&all, 24)];
        drop(all);
        let (sizes, half) = budget_for(&m, 2);
        for (name, policy) in [("--cpu-moe", Policy::CpuMoe), ("half the experts", Policy::Budget(half))] {
            let p = plan(&sizes, c.n_experts, None, policy).unwrap();
            let mut g = GpuModel::upload_part_with(&m, Gpu::open(0).unwrap(), Some(&p), 0..c.n_layers, ColdExperts::InPlace).unwrap();
            g.kv_type = KvType::F32;
            let got = [run(&g, 4), run(&g, 24)];
            let same = got == want;
            let placed = !g.offloaded && g.in_place_bytes > 0;
            println!(
                "CHECK cold experts in place | nano {q}, {name} ({} of {} experts on GPU, {} KiB of host pages) | {} | exact | {}",
                p.experts_on_gpu(),
                c.n_experts * c.n_layers,
                g.in_place_bytes / 1024,
                if same { "equal" } else { "differ" },
                if same && placed { "ok" } else { "FAIL" }
            );
            ok &= same && placed;
        }
        // the same split over two parts (one GPU opened twice, as a two-GPU run splits),
        // each part reading its own layers' cold experts in place; decode through the
        // split's graph
        let p = plan(&sizes, c.n_experts, None, Policy::Budget(half)).unwrap();
        let ranges = vec![0..c.n_layers / 2, c.n_layers / 2..c.n_layers];
        let gpus = vec![Gpu::open(0).unwrap(), Gpu::open(0).unwrap()];
        let mut sm = SplitModel::upload(&m, gpus, &ranges, &[Some(p.clone()), Some(p)], ColdExperts::InPlace).unwrap();
        sm.parts.iter_mut().for_each(|part| part.kv_type = KvType::F32);
        let mut s = SplitSession::new(&sm, 64).unwrap();
        let mut got = Vec::new();
        for ch in prompt.chunks(4) {
            got.extend(sm.forward(None, &mut s, ch, Logits::All).unwrap());
        }
        let mut next = argmax(&got[got.len() - c.vocab_size..]) as u32;
        for _ in 0..6 {
            let l = sm.forward(None, &mut s, &[next], Logits::Last).unwrap();
            next = argmax(&l) as u32;
            got.extend(l);
        }
        let same = got == want[0];
        let placed = sm.parts.iter().all(|part| !part.offloaded) && sm.parts.iter().any(|part| part.in_place_bytes > 0);
        println!(
            "CHECK cold experts in place, split | nano {q}, half the experts, layers {ranges:?} on GPU 0 twice | {} | exact | {}",
            if same { "equal" } else { "differ" },
            if same && placed { "ok" } else { "FAIL" }
        );
        ok &= same && placed;
    }
    assert!(ok);
}

/// `--expert-rebalance` (issue 7): after routing counts move the most used host experts
/// onto the GPU, the logits are those of the all-GPU placement again (the exchanged
/// weights landed in the right slots) and the GPU holds as many experts as before. Both
/// ways of running cold experts: the CPU's (weights written into stack slots; bf16-level
/// tolerance, as the CPU computed some), in place (pages moved between host and device
/// at the same addresses: bit-identical, and a decode graph captured before the move
/// still reads the right weights after it), and mixed (the CPU computes some cold
/// experts while the GPU reads others in place; bf16-level tolerance, before and after).
///
/// Q4_K, mixed: the CPU reads its share from the stacks' page-locked copy, which the moves
/// change under it (a demoted expert's new host pages are opened to the CPU); Q4_K's CPU
/// rounding (q8_K activations) is coarser, so its tolerance is wider, still far below the
/// error of a wrong expert.
#[test]
#[ignore = "needs a GPU"]
fn rebalanced_experts_give_the_same_logits() {
    use mxr_models::gpu::ColdExperts;
    let all = [ColdExperts::Host, ColdExperts::InPlace, ColdExperts::Mixed];
    let ok = rebalance_case(QType::Q8_0, &all, 2e-2) & rebalance_case(QType::Q4K, &[ColdExperts::Mixed], 2.5e-1);
    assert!(ok);
}

/// One type of `rebalanced_experts_give_the_same_logits`, over `ways`; `tol`: the largest
/// distance from all on the GPU where the CPU computes some experts.
fn rebalance_case(q: QType, ways: &[mxr_models::gpu::ColdExperts], tol: f64) -> bool {
    use mxr_models::gpu::ColdExperts;
    use mxr_models::placement::{plan, Policy};
    let m = converted(&repo_root().join("nano/checkpoint"), &format!("nano-rebalance-{q}"), q);
    let c = &m.config;
    let prompt: Vec<u32> =
        mxr_e2e::tokenize(&repo_root().join("nano/checkpoint/tokenizer.json"), "ROMEO:\nWhat light through yonder window breaks?");
    let run = |g: &GpuModel| -> (Vec<f32>, Vec<Vec<u64>>) {
        let mut s = GpuSession::new(g, 64).unwrap();
        let mut out = Vec::new();
        for ch in prompt.chunks(4) {
            out.extend(g.forward_on(Some(&m), &mut s, ch, Logits::All).unwrap());
        }
        let counts = s.expert_counts(g).unwrap();
        (out, counts)
    };
    // decode steps after the prompt, each fed the previous step's top token
    let step = |g: &GpuModel, s: &mut GpuSession, next: &mut u32| -> Vec<f32> {
        let l = g.forward_on(Some(&m), s, &[*next], Logits::Last).unwrap();
        *next = argmax(&l) as u32;
        l
    };
    let all_gpu = gpu_model(&m);
    let (all, _) = run(&all_gpu);
    let decoded = |g: &GpuModel, s: &mut GpuSession| -> (u32, Vec<f32>) {
        let out = g.forward_on(Some(&m), s, &prompt, Logits::Last).unwrap();
        let mut next = argmax(&out) as u32;
        let mut logits = Vec::new();
        for _ in 0..4 {
            logits.extend(step(g, s, &mut next));
        }
        (next, logits)
    };
    let mut ref_s = GpuSession::new(&all_gpu, 64).unwrap();
    let (mut ref_next, mut want) = decoded(&all_gpu, &mut ref_s);
    for _ in 0..4 {
        want.extend(step(&all_gpu, &mut ref_s, &mut ref_next));
    }
    drop(ref_s);
    drop(all_gpu);
    let (sizes, quarter) = budget_for(&m, 4);
    let p = plan(&sizes, c.n_experts, None, Policy::Budget(quarter)).unwrap();
    let mut ok = true;
    for &cold in ways {
        let mut g = GpuModel::upload_part_with(&m, Gpu::open(0).unwrap(), Some(&p), 0..c.n_layers, cold).unwrap();
        g.kv_type = KvType::F32;
        let (first, counts) = run(&g);
        // mixed: before any move, the logits of all on the GPU within the CPU's tolerance,
        // with cold experts both computed by the CPU and read in place
        let mixed_ok = cold != ColdExperts::Mixed
            || {
                use std::sync::atomic::Ordering::Relaxed;
                let d = diff(&first, &all);
                let top1 = top1_same(&first, &all, c.vocab_size);
                let (cpu, read) = (g.cpu_experts.load(Relaxed), g.in_place_experts.load(Relaxed));
                let good = d.max_abs <= tol && top1.0 == top1.1 && cpu > 0 && read > 0;
                println!("CHECK mixed cold experts | nano {q}, a quarter of the experts, {cpu} on the CPU, {read} read in place, the CPU reads the page-locked copy: {} | max abs {:.2e}, top-1 {}/{} | {tol:.1e} | {}", g.cpu_reads_host_pages(), d.max_abs, top1.0, top1.1,
                if good { "ok" } else { "FAIL" });
                good
            };
        ok &= mixed_ok;
        // in place and the CPU's way: a session decodes (its graph captured) before the
        // move, and after
        let mut held = (cold != ColdExperts::Mixed).then(|| {
            let mut s = GpuSession::new(&g, 64).unwrap();
            let (next, logits) = decoded(&g, &mut s);
            (s, next, logits)
        });
        // routing choices that land on resident experts, with the current placement
        let share = |g: &GpuModel| -> u64 {
            counts
                .iter()
                .enumerate()
                .map(|(l, row)| row.iter().enumerate().filter(|(e, _)| g.resident(l, *e)).map(|(_, n)| n).sum::<u64>())
                .sum()
        };
        let (before, host_before) = (share(&g), g.in_place_bytes);
        let swaps = g.rebalance(&m, &counts, 0.0).unwrap();
        let after_share = share(&g);
        let (after, _) = run(&g);
        let d = diff(&after, &all);
        let top1 = top1_same(&after, &all, c.vocab_size);
        let close = match cold {
            ColdExperts::Host | ColdExperts::Mixed => d.max_abs <= tol && top1.0 == top1.1,
            ColdExperts::InPlace => after == all,
        };
        let graph_gap: String;
        let graph_ok = match held.as_mut() {
            Some((s, next, logits)) => {
                for _ in 0..4 {
                    logits.extend(step(&g, s, next));
                }
                // the CPU's experts (posted to the host worker from the graph, captured again
                // after the move) round as the CPU does, and over 8 decoded tokens that
                // compounds: 5.65e-2 on the H200 (the prompt's logits: 1.42e-2). A stale
                // placement in the graph would compute wrong experts, far outside 1e-1.
                let (gd, t) = (diff(logits, &want), top1_same(logits, &want, c.vocab_size));
                graph_gap = format!(" (max abs {:.2e}, top-1 {}/{})", gd.max_abs, t.0, t.1);
                match cold {
                    ColdExperts::InPlace => *logits == want,
                    _ => gd.max_abs <= 1e-1 && t.0 == t.1,
                }
            }
            // mixed: a session captured after the move decodes with the host worker
            // reading the moved stacks
            None => {
                let mut s = GpuSession::new(&g, 64).unwrap();
                let (_, logits) = decoded(&g, &mut s);
                let (gd, t) = (diff(&logits, &want[..logits.len()]), top1_same(&logits, &want[..logits.len()], c.vocab_size));
                graph_gap = format!(" (decoded after it: max abs {:.2e}, top-1 {}/{})", gd.max_abs, t.0, t.1);
                gd.max_abs <= tol.max(1e-1) && t.0 == t.1
            }
        };
        let same_memory = g.in_place_bytes == host_before;
        let this = !swaps.is_empty() && after_share > before && close && graph_ok && same_memory;
        println!(
            "CHECK expert rebalance | nano {q}, a quarter of the experts, {cold:?}, {} exchanges, GPU share of choices {before} -> {after_share} | max abs {:.2e}, top-1 {}/{}, graph across the move {graph_ok}{graph_gap}, host bytes kept {same_memory} | {} | {}",
            swaps.len(),
            d.max_abs,
            top1.0,
            top1.1,
            if cold == ColdExperts::InPlace { "exact".to_string() } else { format!("{tol:.1e}") },
            if this { "ok" } else { "FAIL" }
        );
        ok &= this;
    }
    ok
}

/// Issue 7, sequences decoded side by side (`mxr bench --parallel`): three sequences, each
/// on a lane of its own, their decode steps in flight together (one launched as soon as
/// its last one is done, as the bench does), a prefill on the main stream between two runs
/// of steps, decode the same logits bit for bit as each sequence alone: with every expert
/// on the GPU, with three quarters of them on the CPU, and mixed (the CPU's host worker
/// answering the three graphs' posts as they come). A second start before the logits are
/// taken, and a finish with nothing in flight, are errors.
#[test]
#[ignore = "needs a GPU"]
fn sequences_decoded_side_by_side_give_each_its_own_logits() {
    use mxr_models::gpu::ColdExperts;
    use mxr_models::offload_cost::DeviceRates;
    use mxr_models::placement::{plan, Policy};
    let texts = ["ROMEO:\nWhat light", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed"];
    let tok = repo_root().join("nano/checkpoint/tokenizer.json");
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| mxr_e2e::tokenize(&tok, t)).collect();
    // per sequence: the prompt, 6 greedy steps, 3 tokens as one batch, 2 more steps; the
    // logits of every step and batch. Side by side: the steps of all sequences in flight
    // together; else each sequence alone, one after another.
    let run = |g: &GpuModel, m: &Model, side_by_side: bool| -> Vec<Vec<f32>> {
        let mut ss: Vec<GpuSession> = prompts.iter().map(|_| GpuSession::new(g, 64).unwrap()).collect();
        let mut out = vec![Vec::new(); ss.len()];
        let mut next: Vec<u32> = Vec::new();
        for (s, p) in ss.iter_mut().zip(&prompts) {
            if side_by_side {
                s.use_lane(g).unwrap();
            }
            next.push(argmax(&g.forward_on(Some(m), s, p, Logits::Last).unwrap()) as u32);
        }
        let steps = |ss: &mut [GpuSession], next: &mut [u32], out: &mut [Vec<f32>], n: usize| {
            if !side_by_side {
                for ((s, t), o) in ss.iter_mut().zip(next.iter_mut()).zip(out.iter_mut()) {
                    for _ in 0..n {
                        let l = g.forward_on(Some(m), s, &[*t], Logits::Last).unwrap();
                        *t = argmax(&l) as u32;
                        o.extend(l);
                    }
                }
                return;
            }
            for (s, t) in ss.iter_mut().zip(next.iter()) {
                assert!(g.decode_ready(s).is_err(), "no step in flight yet");
                g.decode_start(Some(m), s, *t).unwrap();
            }
            // each sequence's next step launched as soon as its last is done, whichever
            // ends first (as mxr bench --parallel does)
            let mut left = vec![n; ss.len()];
            let t0 = std::time::Instant::now();
            while left.iter().any(|&k| k > 0) {
                assert!(t0.elapsed().as_secs() < 60, "a step in flight never became ready");
                for (((s, t), o), k) in ss.iter_mut().zip(next.iter_mut()).zip(out.iter_mut()).zip(left.iter_mut()) {
                    if *k == 0 || !g.decode_ready(s).unwrap() {
                        continue;
                    }
                    let l = g.decode_finish(s, |l| l.logits.to_vec()).unwrap();
                    *t = argmax(&l) as u32;
                    o.extend(l);
                    *k -= 1;
                    if *k > 0 {
                        g.decode_start(Some(m), s, *t).unwrap();
                    }
                }
            }
            for s in ss.iter() {
                assert!(g.decode_ready(s).is_err(), "every step's logits were taken");
            }
        };
        steps(&mut ss, &mut next, &mut out, 6);
        for ((s, t), o) in ss.iter_mut().zip(next.iter_mut()).zip(out.iter_mut()) {
            let l = g.forward_on(Some(m), s, &[*t, 7, 11], Logits::Last).unwrap();
            *t = argmax(&l) as u32;
            o.extend(l);
        }
        steps(&mut ss, &mut next, &mut out, 2);
        out
    };
    let mut ok = true;
    for q in [QType::Q8_0, QType::Q4K] {
        let m = converted(&repo_root().join("nano/checkpoint"), "nano-offload-graph", q);
        let c = &m.config;
        let (sizes, quarter) = budget_for(&m, 4);
        let p = plan(&sizes, c.n_experts, None, Policy::Budget(quarter)).unwrap();
        let placed = |cold| {
            let mut g = GpuModel::upload_part_with(&m, Gpu::open(0).unwrap(), Some(&p), 0..c.n_layers, cold).unwrap();
            g.kv_type = KvType::F32;
            g.rates = DeviceRates { cpu_expert_gbps: 20.0, in_place_gbps: 20.0, ..DeviceRates::DEFAULT };
            g
        };
        let all = || {
            let mut g = gpu_model(&m);
            g.kv_type = KvType::F32;
            g
        };
        for (name, g) in [
            ("all on the GPU", all()),
            ("a quarter on the GPU, the rest on the CPU", placed(ColdExperts::Host)),
            ("a quarter on the GPU, mixed", placed(ColdExperts::Mixed)),
        ] {
            let alone = run(&g, &m, false);
            let together = run(&g, &m, true);
            let worst = alone.iter().zip(&together).map(|(a, b)| diff(a, b).max_abs).fold(0f64, f64::max);
            let same = alone == together;
            // a second start before the first's logits are taken; a finish with none
            let mut s = GpuSession::new(&g, 64).unwrap();
            s.use_lane(&g).unwrap();
            let first = g.decode_start(Some(&m), &mut s, 5).is_ok();
            let second = g.decode_start(Some(&m), &mut s, 6).err().map(|e| e.to_string()).unwrap_or_default();
            let taken = g.decode_finish(&mut s, |l| l.logits.len()).ok() == Some(c.vocab_size);
            let none = g.decode_finish(&mut s, |_| ()).err().map(|e| e.to_string()).unwrap_or_default();
            let errors = first && second.contains("in flight") && taken && none.contains("no decode step");
            let this = same && errors;
            println!(
                "CHECK sequences side by side | nano {q}, {name}: 3 sequences, 8 steps and a batch each, on lanes against alone | max abs {worst:.2e}, errors for a second start and an empty finish {errors} | exact | {}",
                if this { "ok" } else { "FAIL" }
            );
            ok &= this;
        }
    }
    assert!(ok);
}
