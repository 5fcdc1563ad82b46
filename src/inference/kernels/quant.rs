//! Matrix products with quantised weights read in the GGUF blocks they are stored in (Q4_K, Q6_K,
//! Q8_0), so a weight lives in memory once. candle's x86 kernels first copy Q4_K, Q6_K and Q8_0
//! weights into tiles of their own and keep both copies (about 2.3 times the file's size once a
//! prompt has run), and they read the wider tiles on every decode step.
//!
//! The activations are quantised once per input (8 bits per value, one scale per 256 values,
//! exactly as candle's Q8_K does, so both compute the same integer products), and one pass of
//! candle's thread pool covers every weight that shares them (q/k/v, gate/up). Each unit of work
//! is a block of weight rows against up to four activation rows at a time: the unpacked weights
//! are reused for every row of a batched step or a prompt chunk instead of being read per row.

/// Values per activation block and per K-quant super-block.
pub const QK: usize = 256;

/// Weight rows per unit of work.
const ROW_BLOCK: usize = 16;

/// Activation rows taken together against each weight row.
pub const MAX_ROWS: usize = 4;

/// Quantised weight formats our kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    Q4K,
    Q6K,
    Q8_0,
}

impl QuantKind {
    /// Bytes that hold 256 values of one row.
    pub fn bytes_per_block(self) -> usize {
        match self {
            QuantKind::Q4K => 144,
            QuantKind::Q6K => 210,
            QuantKind::Q8_0 => 8 * 34,
        }
    }
}

/// A weight matrix `[rows][cols]` as its stored blocks.
#[derive(Clone, Copy)]
pub struct QWeight<'a> {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    data: &'a [u8],
}

impl<'a> QWeight<'a> {
    /// `None` when `cols` is not a whole number of 256-value blocks or `data` is not the size
    /// such a matrix takes.
    pub fn new(kind: QuantKind, rows: usize, cols: usize, data: &'a [u8]) -> Option<Self> {
        let ok = cols > 0
            && cols.is_multiple_of(QK)
            && data.len() == rows * cols / QK * kind.bytes_per_block();
        ok.then_some(Self {
            kind,
            rows,
            cols,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub(super) fn row(&self, j: usize) -> &'a [u8] {
        let len = self.cols / QK * self.kind.bytes_per_block();
        &self.data[j * len..(j + 1) * len]
    }
}

/// 256 activations as 8-bit integers: value `i` is `d32[i / 32] * qs[i]`. For the K-quants one
/// scale covers all 256 (`d`, repeated in `d32`) and `sums` holds the sum of each 16 `qs` and
/// `sums32` of each 32, which the weights' offsets (16-value sub-blocks) and minimums (32-value
/// sub-blocks) multiply; for Q8_0 weights each 32 values have their own scale, as llama.cpp
/// quantises them for those weights.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct ActBlock {
    pub qs: [i8; QK],
    pub sums: [i16; QK / 16],
    pub sums32: [i16; QK / 32],
    pub d: f32,
    pub d32: [f32; QK / 32],
}

impl ActBlock {
    const ZERO: Self = Self {
        qs: [0; QK],
        sums: [0; QK / 16],
        sums32: [0; QK / 32],
        d: 0.0,
        d32: [0.0; QK / 32],
    };

    /// The value of largest magnitude becomes ∓127, as candle's (and ggml's) Q8_K quantiser
    /// does it (the first such value when several tie). Written so every loop vectorises.
    #[inline(always)]
    fn quantize(x: &[f32]) -> Self {
        let mut b = Self::ZERO;
        let mut lanes = [0f32; 16];
        for c in x.chunks_exact(16) {
            for (m, &v) in lanes.iter_mut().zip(c) {
                *m = m.max(v.abs());
            }
        }
        let amax = lanes.iter().copied().fold(0f32, f32::max);
        if amax == 0.0 {
            return b;
        }
        let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = round_half_away(iscale * v).clamp(-127.0, 127.0) as i8;
        }
        for (s, chunk) in b.sums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = chunk.iter().map(|&q| q as i16).sum();
        }
        for (s, pair) in b.sums32.iter_mut().zip(b.sums.chunks_exact(2)) {
            *s = pair[0] + pair[1];
        }
        b.d = 1.0 / iscale;
        b.d32 = [b.d; QK / 32];
        b
    }

    /// Each 32 values with their own scale, largest magnitude to ±127 (ggml's Q8_0 quantiser).
    #[inline(always)]
    fn quantize_per_32(x: &[f32]) -> Self {
        let mut b = Self::ZERO;
        for ((qs, d), x) in
            b.qs.chunks_exact_mut(32)
                .zip(&mut b.d32)
                .zip(x.chunks_exact(32))
        {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            *d = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (q, &v) in qs.iter_mut().zip(x) {
                *q = round_half_away(v * id) as i8;
            }
        }
        b
    }
}

/// How a weight kind wants its activations quantised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActStyle {
    /// One scale per 256 values, with 16-value sums (the K-quants).
    PerBlock,
    /// One scale per 32 values (Q8_0).
    Per32,
}

impl QuantKind {
    fn act_style(self) -> ActStyle {
        match self {
            QuantKind::Q4K | QuantKind::Q6K => ActStyle::PerBlock,
            QuantKind::Q8_0 => ActStyle::Per32,
        }
    }
}

/// Rows of activations quantised for the weights' dot products.
pub struct Acts {
    blocks: Vec<ActBlock>,
    per_row: usize,
}

impl Acts {
    /// `x` is `[rows][cols]`; `cols` a multiple of 256. Rows are spread over the thread pool.
    fn quantize(x: &[f32], cols: usize, style: ActStyle) -> Self {
        let per_row = cols / QK;
        let mut blocks = vec![ActBlock::ZERO; x.len() / QK];
        let addr = blocks.as_mut_ptr() as usize;
        let run = |rows: std::ops::Range<usize>| {
            let (from, to) = (rows.start * per_row, rows.end * per_row);
            // SAFETY: units cover disjoint rows of `blocks`, which outlives the pool's pass.
            let out = unsafe {
                std::slice::from_raw_parts_mut((addr as *mut ActBlock).add(from), to - from)
            };
            let x = &x[from * QK..to * QK];
            #[cfg(target_arch = "x86_64")]
            if super::detected_isa() == super::Isa::Avx2 {
                // SAFETY: AVX2 and FMA were detected.
                return unsafe { quantize_blocks_avx2(x, out, style) };
            }
            quantize_blocks(x, out, style)
        };
        candle_core::utils::barrier_pool().execute_chunked(x.len() / cols, run);
        Self { blocks, per_row }
    }

    pub fn rows(&self) -> usize {
        self.blocks.len().checked_div(self.per_row).unwrap_or(0)
    }

    fn row(&self, r: usize) -> &[ActBlock] {
        &self.blocks[r * self.per_row..(r + 1) * self.per_row]
    }
}

/// `v.round()` (halves away from zero) from a truncation, which vectorises to one instruction
/// where `round` is a call into the C library for each value.
#[inline(always)]
fn round_half_away(v: f32) -> f32 {
    let t = v.trunc();
    // The fractional part is exact.
    if (v - t).abs() >= 0.5 {
        t + 1f32.copysign(v)
    } else {
        t
    }
}

#[inline(always)]
fn quantize_blocks(x: &[f32], out: &mut [ActBlock], style: ActStyle) {
    // A match per loop, not a function pointer, so each quantiser is inlined and vectorised.
    let blocks = out.iter_mut().zip(x.chunks_exact(QK));
    match style {
        ActStyle::PerBlock => blocks.for_each(|(b, x)| *b = ActBlock::quantize(x)),
        ActStyle::Per32 => blocks.for_each(|(b, x)| *b = ActBlock::quantize_per_32(x)),
    }
}

/// [`quantize_blocks`] compiled for AVX2, where its loops vectorise (and rounding is one
/// instruction instead of a call).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_blocks_avx2(x: &[f32], out: &mut [ActBlock], style: ActStyle) {
    quantize_blocks(x, out, style)
}

/// Products of a block of weight rows (`first..first + out.len()`) with up to [`MAX_ROWS`]
/// activation rows: `out[j][r]` for weight row `first + j` and activation row `r`.
pub(super) type BlockFn = fn(&QWeight<'_>, usize, &[&[ActBlock]], &mut [[f32; MAX_ROWS]]);

/// Which loops multiply quantised weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loops {
    Portable,
    /// AVX2 with FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F, BW and VNNI, with the AVX2 set.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Loops {
    /// Every set this CPU runs, the best last (tests run them all).
    pub fn available() -> Vec<Loops> {
        let mut all = vec![Loops::Portable];
        #[cfg(target_arch = "x86_64")]
        if super::detected_isa() == super::Isa::Avx2 {
            all.push(Loops::Avx2);
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                all.push(Loops::Avx512);
            }
        }
        all
    }

    /// The best set this CPU runs, detected once.
    pub fn detected() -> Loops {
        use std::sync::OnceLock;
        static LOOPS: OnceLock<Loops> = OnceLock::new();
        *LOOPS.get_or_init(|| *Self::available().last().unwrap_or(&Loops::Portable))
    }

    fn kernel(self, kind: QuantKind) -> BlockFn {
        match self {
            Loops::Portable => super::quant_portable::block_fn(kind),
            #[cfg(target_arch = "x86_64")]
            Loops::Avx2 => super::quant_x86::block_fn(kind),
            #[cfg(target_arch = "x86_64")]
            Loops::Avx512 => super::quant_avx512::block_fn(kind),
        }
    }
}

/// `x · wᵀ` for every weight in `ws` (all with `x`'s row length), with the best loops this CPU
/// has. Returns one `[rows][w.rows]` result per weight.
pub fn matmul(ws: &[QWeight<'_>], x: &[f32]) -> Vec<Vec<f32>> {
    matmul_with(Loops::detected(), ws, x)
}

/// [`matmul`] with the given loops (tests run every set this CPU has).
pub fn matmul_with(loops: Loops, ws: &[QWeight<'_>], x: &[f32]) -> Vec<Vec<f32>> {
    let Some(cols) = ws.first().map(|w| w.cols) else {
        return Vec::new();
    };
    assert!(
        ws.iter().all(|w| w.cols == cols) && x.len().is_multiple_of(cols),
        "weights and input disagree on the row length"
    );
    // Quantised once per style the weights need (a file mixing K-quants and Q8_0 needs both).
    let styles = [ActStyle::PerBlock, ActStyle::Per32];
    let acts: Vec<Option<Acts>> = styles
        .iter()
        .map(|&st| {
            ws.iter()
                .any(|w| w.kind.act_style() == st)
                .then(|| Acts::quantize(x, cols, st))
        })
        .collect();
    let m = x.len() / cols;
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows]).collect();
    // Units: (weight, block of its rows); the outputs are written at disjoint places.
    let mut starts = Vec::with_capacity(ws.len());
    let mut total = 0;
    for w in ws {
        starts.push(total);
        total += w.rows.div_ceil(ROW_BLOCK);
    }
    let fns: Vec<BlockFn> = ws.iter().map(|w| loops.kernel(w.kind)).collect();
    let ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    let rows: Vec<Vec<&[ActBlock]>> = acts
        .iter()
        .map(|a| {
            a.as_ref()
                .map_or(Vec::new(), |a| (0..m).map(|r| a.row(r)).collect())
        })
        .collect();
    let rows_of: Vec<&[&[ActBlock]]> = ws
        .iter()
        .map(|w| {
            rows[styles
                .iter()
                .position(|&st| st == w.kind.act_style())
                .unwrap_or(0)]
            .as_slice()
        })
        .collect();
    let run = |units: std::ops::Range<usize>| {
        let mut got = [[0f32; MAX_ROWS]; ROW_BLOCK];
        for unit in units {
            let wi = starts.partition_point(|&s| s <= unit) - 1;
            let w = &ws[wi];
            let first = (unit - starts[wi]) * ROW_BLOCK;
            let got = &mut got[..ROW_BLOCK.min(w.rows - first)];
            let out = ptrs[wi] as *mut f32;
            for r0 in (0..m).step_by(MAX_ROWS) {
                let group = &rows_of[wi][r0..(r0 + MAX_ROWS).min(m)];
                fns[wi](w, first, group, got);
                for (j, g) in got.iter().enumerate() {
                    for (i, &v) in g[..group.len()].iter().enumerate() {
                        // SAFETY: (row r0 + i, column first + j) lies inside this weight's
                        // output, and no other unit writes that column.
                        unsafe { *out.add((r0 + i) * w.rows + first + j) = v };
                    }
                }
            }
        }
    };
    candle_core::utils::barrier_pool().execute_chunked(total, run);
    outs
}

#[cfg(test)]
mod tests {
    use super::super::test_data::seeded;
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
    use candle_core::{Device, Module, Tensor};
    use half::f16;

    #[test]
    fn rounding_takes_halves_away_from_zero_as_round_does() {
        for v in [
            0.0f32, 0.49999997, 0.5, 1.5, 2.5, -0.5, -1.5, -2.4999998, 126.5, -127.5, 3.7, -3.7,
        ] {
            assert_eq!(round_half_away(v), v.round(), "{v}");
        }
        for x in seeded(10_000, 9) {
            let v = x * 130.0;
            assert_eq!(round_half_away(v), v.round(), "{v}");
        }
    }

    fn isas() -> Vec<Loops> {
        Loops::available()
    }

    fn kind_of(dtype: GgmlDType) -> QuantKind {
        match dtype {
            GgmlDType::Q4K => QuantKind::Q4K,
            GgmlDType::Q6K => QuantKind::Q6K,
            GgmlDType::Q8_0 => QuantKind::Q8_0,
            other => panic!("{other:?} is not ours"),
        }
    }

    /// candle's own quantised product on the same weights and input.
    fn candle_product(q: &QTensor, x: &[f32], m: usize, k: usize) -> Vec<f32> {
        let x = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
        let storage = QStorage::from_data(q.data().unwrap(), &Device::Cpu, q.dtype()).unwrap();
        let copy = QTensor::new(storage, q.shape().clone()).unwrap();
        let w = QMatMul::from_qtensor(copy).unwrap();
        w.forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Every weight row against the dequantised activations, in f64: what the kernel's integer
    /// sums must give exactly, up to the order of f32 additions.
    fn exact(q: &QTensor, acts: &Acts, n: usize, k: usize) -> Vec<f64> {
        let w: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut out = Vec::new();
        for r in 0..acts.rows() {
            let a: Vec<f64> = acts
                .row(r)
                .iter()
                .flat_map(|b| {
                    b.qs.iter()
                        .enumerate()
                        .map(move |(i, &q)| q as f64 * b.d32[i / 32] as f64)
                })
                .collect();
            for j in 0..n {
                out.push((0..k).map(|i| w[j * k + i] as f64 * a[i]).sum());
            }
        }
        out
    }

    fn max_rel(got: &[f32], want: impl Iterator<Item = f64> + Clone) -> f64 {
        let scale = want.clone().fold(0f64, |m, v| m.max(v.abs()));
        got.iter()
            .zip(want)
            .map(|(&g, w)| (g as f64 - w).abs() / scale)
            .fold(0f64, f64::max)
    }

    #[test]
    fn every_kind_matches_candle_and_the_exact_sums_for_every_row_count() {
        let (n, k) = (40, 768);
        for (seed, dtype) in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0]
            .into_iter()
            .enumerate()
        {
            let wf = seeded(n * k, 11 + seed as u64);
            let wt = Tensor::from_slice(&wf, (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let data = q.data().unwrap();
            let w = QWeight::new(kind_of(dtype), n, k, &data).unwrap();
            // 1 (decode), 3 and 4 (one group), 9 (two groups and a tail).
            for m in [1, 3, 4, 9] {
                let x = seeded(m * k, 100 + m as u64);
                let acts = Acts::quantize(&x, k, kind_of(dtype).act_style());
                let want = exact(&q, &acts, n, k);
                let theirs = candle_product(&q, &x, m, k);
                for isa in isas() {
                    let got = matmul_with(isa, &[w], &x).remove(0);
                    let e = max_rel(&got, want.iter().copied());
                    assert!(e < 1e-5, "{dtype:?} {isa:?} m={m}: {e} from the exact sums");
                    let c = max_rel(&got, theirs.iter().map(|&v| v as f64));
                    assert!(
                        c < 1e-3,
                        "{dtype:?} {isa:?} m={m}: {c} from candle's product"
                    );
                }
            }
        }
    }

    #[test]
    fn weights_sharing_an_input_each_get_their_own_product() {
        let k = 512;
        let x = seeded(2 * k, 5);
        let qs: Vec<(QTensor, usize)> = [
            (48, GgmlDType::Q4K),
            (16, GgmlDType::Q6K),
            (33, GgmlDType::Q8_0),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (n, dtype))| {
            let wt = Tensor::from_vec(seeded(n * k, 40 + i as u64), (n, k), &Device::Cpu).unwrap();
            (QTensor::quantize(&wt, dtype).unwrap(), n)
        })
        .collect();
        let data: Vec<_> = qs.iter().map(|(q, _)| q.data().unwrap()).collect();
        let ws: Vec<QWeight<'_>> = qs
            .iter()
            .zip(&data)
            .map(|((q, n), d)| QWeight::new(kind_of(q.dtype()), *n, k, d).unwrap())
            .collect();
        for isa in isas() {
            let outs = matmul_with(isa, &ws, &x);
            for ((q, n), got) in qs.iter().zip(&outs) {
                assert_eq!(got.len(), 2 * n);
                let alone = matmul_with(
                    isa,
                    &[QWeight::new(kind_of(q.dtype()), *n, k, &q.data().unwrap()).unwrap()],
                    &x,
                );
                assert_eq!(
                    got, &alone[0],
                    "{isa:?}: a fused product differs from its own"
                );
                let theirs = candle_product(q, &x, 2, k);
                let c = max_rel(got, theirs.iter().map(|&v| v as f64));
                assert!(
                    c < 1e-3,
                    "{isa:?} {:?}: {c} from candle's product",
                    q.dtype()
                );
            }
        }
    }

    /// Arbitrary bytes in every field but the f16 scales (kept finite): the largest 6-bit
    /// scales and minimums, Q6_K scales of -128 and Q8_0 values of -128 included, where an
    /// intermediate sum of a vector loop could overflow.
    #[test]
    fn arbitrary_blocks_give_the_portable_sums_in_every_loop_set() {
        let (n, k, m) = (20, 512, 5);
        let x = seeded(m * k, 77);
        for kind in [QuantKind::Q4K, QuantKind::Q6K, QuantKind::Q8_0] {
            let noise = seeded(n * k / QK * kind.bytes_per_block(), 99);
            let mut data: Vec<u8> = noise.iter().map(|&v| ((v + 1.0) * 127.99) as u8).collect();
            let d = f16::from_f32(0.01).to_le_bytes();
            for blk in data.chunks_exact_mut(kind.bytes_per_block()) {
                let at: &[usize] = match kind {
                    QuantKind::Q4K => &[0, 2],
                    QuantKind::Q6K => &[208],
                    QuantKind::Q8_0 => &[0, 34, 68, 102, 136, 170, 204, 238],
                };
                for &a in at {
                    blk[a..a + 2].copy_from_slice(&d);
                }
            }
            let w = QWeight::new(kind, n, k, &data).unwrap();
            let want = matmul_with(Loops::Portable, &[w], &x).remove(0);
            assert!(want.iter().any(|&v| v != 0.0));
            for loops in isas() {
                let got = matmul_with(loops, &[w], &x).remove(0);
                let e = max_rel(&got, want.iter().map(|&v| v as f64));
                assert!(e < 1e-5, "{kind:?} {loops:?}: {e} from the portable sums");
            }
        }
    }

    #[test]
    fn shapes_that_are_not_whole_blocks_are_refused() {
        assert!(QWeight::new(QuantKind::Q4K, 2, 100, &[0; 288]).is_none());
        assert!(QWeight::new(QuantKind::Q4K, 2, 256, &[0; 287]).is_none());
        assert!(QWeight::new(QuantKind::Q4K, 2, 256, &[0; 288]).is_some());
    }

    #[test]
    fn an_all_zero_input_gives_zeros_not_nan() {
        let k = 256;
        let wt = Tensor::from_vec(seeded(16 * k, 3), (16, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wt, GgmlDType::Q6K).unwrap();
        let data = q.data().unwrap();
        let w = QWeight::new(QuantKind::Q6K, 16, k, &data).unwrap();
        for isa in isas() {
            let got = matmul_with(isa, &[w], &vec![0.0; k]).remove(0);
            assert!(got.iter().all(|&v| v == 0.0), "{isa:?}: {got:?}");
        }
    }
}
