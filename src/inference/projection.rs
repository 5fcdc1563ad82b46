//! Products of a step's activations with the model's weights: weights sharing an input stacked
//! into one matrix, quantised weights through candle's kernels (repacked copies) or, with
//! compact CPU weights, through ours on the stored blocks.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Module, Tensor};

use super::kernels;

/// Weights multiplied with one shared input (q/k/v, gate/up). Adjacent quantised CPU weights of
/// one type are stacked at load into one matrix of their rows, so each step quantises the input
/// once for all of them and one pass of the thread pool covers them (candle's prompt kernels
/// take one weight at a time and would quantise a prompt chunk again for each). Each weight
/// stays its own block of rows: products are the same as apart, and nothing is held twice.
pub(crate) struct SharedInput {
    groups: Vec<Stack>,
}

/// One matrix of stacked weights and the output width each of them gives.
struct Stack {
    w: QMatMul,
    widths: Vec<usize>,
}

impl SharedInput {
    /// Stacks runs of `ws` that are quantised alike on the CPU; dense and device weights stay
    /// apart. The stacked weights' own storage is dropped as each stack is made.
    pub(crate) fn new(ws: Vec<QMatMul>) -> candle_core::Result<Self> {
        let mut runs: Vec<Result<Vec<Arc<QTensor>>, QMatMul>> = Vec::new();
        for w in ws {
            match w {
                QMatMul::QTensor(t) if t.device().is_cpu() => {
                    let cols = t.shape().dims2()?.1;
                    let last = runs.last_mut().and_then(|r| r.as_mut().ok());
                    match last {
                        Some(run) if run.last().is_some_and(|p| alike(p, &t, cols)) => run.push(t),
                        _ => runs.push(Ok(vec![t])),
                    }
                }
                w => runs.push(Err(w)),
            }
        }
        let groups = runs
            .into_iter()
            .map(|run| match run {
                Ok(run) => stack(run),
                Err(w) => Ok(Stack {
                    widths: vec![out_width(&w)?],
                    w,
                }),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { groups })
    }

    /// How many matrices the weights are held in (tests check what was stacked).
    #[cfg(test)]
    pub(crate) fn matrices(&self) -> usize {
        self.groups.len()
    }

    /// `x · wᵀ` for each weight, in the order given to [`SharedInput::new`]: contiguous tensors
    /// with the input's leading dimensions.
    pub(crate) fn forward(&self, x: &Tensor, compact: bool) -> candle_core::Result<Vec<Tensor>> {
        split(self.forward_stacked(x, compact)?)
    }

    /// Each matrix's product with `x`, its weights' outputs side by side along the last
    /// dimension, and those outputs' widths.
    pub(crate) fn forward_stacked(
        &self,
        x: &Tensor,
        compact: bool,
    ) -> candle_core::Result<Vec<(Tensor, &[usize])>> {
        let ws: Vec<&QMatMul> = self.groups.iter().map(|g| &g.w).collect();
        if compact && let Some(ys) = quantised(&ws, x)? {
            return Ok(ys
                .into_iter()
                .zip(&self.groups)
                .map(|(y, g)| (y, g.widths.as_slice()))
                .collect());
        }
        self.groups
            .iter()
            .map(|g| Ok((linear(&g.w, x, compact)?, g.widths.as_slice())))
            .collect()
    }
}

/// [`SharedInput::forward_stacked`]'s products cut into each weight's own contiguous output.
pub(crate) fn split(stacked: Vec<(Tensor, &[usize])>) -> candle_core::Result<Vec<Tensor>> {
    let mut out = Vec::new();
    for (y, widths) in stacked {
        if let [_] = widths {
            out.push(y);
            continue;
        }
        let mut at = 0;
        for &n in widths {
            out.push(y.narrow(D::Minus1, at, n)?.contiguous()?);
            at += n;
        }
    }
    Ok(out)
}

/// `x · wᵀ` for every weight of `ws` through our quantised kernels, which read the stored blocks
/// (no second copy of the weights) and quantise `x` once for all of them. `None` unless `x` is
/// f32 on a CPU with our AVX2 or AVX-512 loops and every weight is Q4_K, Q6_K or Q8_0 with rows
/// of whole 256-value blocks; candle's kernels take the rest.
fn quantised(ws: &[&QMatMul], x: &Tensor) -> candle_core::Result<Option<Vec<Tensor>>> {
    use candle_core::quantized::GgmlDType;
    use kernels::quant::{QWeight, QuantKind};
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || kernels::quant::Loops::detected() == kernels::quant::Loops::Portable
    {
        return Ok(None);
    }
    let mut tensors = Vec::with_capacity(ws.len());
    for w in ws {
        let QMatMul::QTensor(t) = w else {
            return Ok(None);
        };
        tensors.push(t.as_ref());
    }
    let data = tensors
        .iter()
        .map(|t| t.data())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let k = x.dim(D::Minus1)?;
    let mut weights = Vec::with_capacity(ws.len());
    for (t, bytes) in tensors.iter().zip(&data) {
        let kind = match t.dtype() {
            GgmlDType::Q4K => QuantKind::Q4K,
            GgmlDType::Q6K => QuantKind::Q6K,
            GgmlDType::Q8_0 => QuantKind::Q8_0,
            _ => return Ok(None),
        };
        let (n, cols) = t.shape().dims2()?;
        match QWeight::new(kind, n, cols, bytes) {
            Some(w) if cols == k => weights.push(w),
            _ => return Ok(None),
        }
    }
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let dims = x.dims().to_vec();
    kernels::quant::matmul(&weights, &xs)
        .into_iter()
        .zip(&weights)
        .map(|(y, w)| {
            let mut shape = dims.clone();
            shape[dims.len() - 1] = w.rows();
            Tensor::from_vec(y, shape, x.device())
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map(Some)
}

/// `x · wᵀ` for rows of `x`. With a handful of rows (batched decode) dense weights are
/// multiplied the other way round, `(w · xᵀ)ᵀ`, so the matrix kernel's tile runs along the
/// weight's many rows instead of being mostly padding around a few input rows.
pub(crate) fn linear(w: &QMatMul, x: &Tensor, compact: bool) -> candle_core::Result<Tensor> {
    if compact && let Some(mut ys) = quantised(&[w], x)? {
        return Ok(ys.remove(0));
    }
    let rows = x.elem_count() / x.dim(D::Minus1)?;
    match w {
        QMatMul::Tensor(wt) if (2..=32).contains(&rows) => {
            let dims = x.dims().to_vec();
            let x2 = x.reshape((rows, dims[dims.len() - 1]))?;
            let y = wt.matmul(&x2.t()?.contiguous()?)?.t()?.contiguous()?;
            let mut out_dims = dims;
            let last = out_dims.len() - 1;
            out_dims[last] = wt.dim(0)?;
            y.reshape(out_dims)
        }
        _ => w.forward(x),
    }
}

/// Rows a weight gives each input row.
fn out_width(w: &QMatMul) -> candle_core::Result<usize> {
    match w {
        QMatMul::QTensor(t) => t.shape().dims2().map(|d| d.0),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims2().map(|d| d.0),
    }
}

/// Whether `t` can go below `p`: the same type and row length.
fn alike(p: &QTensor, t: &QTensor, cols: usize) -> bool {
    p.dtype() == t.dtype() && p.shape().dims2().is_ok_and(|d| d.1 == cols)
}

/// One quantised matrix of the rows of `run` (same type and row length), in order. The byte
/// rows of a GGUF tensor are whole blocks, so stacking is concatenating the stored bytes.
fn stack(run: Vec<Arc<QTensor>>) -> candle_core::Result<Stack> {
    let widths = run
        .iter()
        .map(|t| t.shape().dims2().map(|d| d.0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let [_, _, ..] = run.as_slice() else {
        let t = run
            .into_iter()
            .next()
            .ok_or_else(|| candle_core::Error::Msg("no weights to stack".into()))?;
        return Ok(Stack {
            w: QMatMul::QTensor(t),
            widths,
        });
    };
    let (dtype, cols, device) = (run[0].dtype(), run[0].shape().dims2()?.1, run[0].device());
    let mut bytes = Vec::with_capacity(run.iter().map(|t| t.storage_size_in_bytes()).sum());
    for t in run {
        bytes.extend_from_slice(&t.data()?);
    }
    let rows = widths.iter().sum();
    let t = candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        &bytes,
        vec![rows, cols],
        &device,
    )?;
    Ok(Stack {
        w: QMatMul::QTensor(Arc::new(t)),
        widths,
    })
}

#[cfg(test)]
mod tests {
    use super::super::kernels::test_data::seeded;
    use super::*;
    use candle_core::Device;
    use candle_core::quantized::GgmlDType;

    fn weight(rows: usize, cols: usize, dtype: GgmlDType, seed: u64) -> QMatMul {
        let t = Tensor::from_vec(seeded(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        match dtype {
            GgmlDType::F32 => QMatMul::Tensor(t),
            _ => QMatMul::from_qtensor(QTensor::quantize(&t, dtype).unwrap()).unwrap(),
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn weights_quantised_alike_are_stacked_and_give_the_products_they_gave_apart() {
        let cols = 512;
        let parts = [
            (GgmlDType::F32, 48),
            (GgmlDType::Q4K, 64),
            (GgmlDType::Q4K, 32),
            (GgmlDType::Q6K, 32),
            (GgmlDType::Q8_0, 16),
            (GgmlDType::Q8_0, 48),
        ];
        let make = || -> Vec<QMatMul> {
            parts
                .iter()
                .enumerate()
                .map(|(i, &(dtype, rows))| weight(rows, cols, dtype, i as u64 + 1))
                .collect()
        };
        let apart = make();
        let shared = SharedInput::new(make()).unwrap();
        // Dense apart, the two Q4_K together, Q6_K alone, the two Q8_0 together.
        assert_eq!(shared.matrices(), 4);
        // One row (decode), a batch, and a prompt chunk past candle's 32-row prompt kernels.
        for m in [1, 3, 40] {
            let x = Tensor::from_vec(seeded(m * cols, 9), (m, cols), &Device::Cpu).unwrap();
            for compact in [false, true] {
                let got = shared.forward(&x, compact).unwrap();
                assert_eq!(got.len(), parts.len());
                for (i, (g, w)) in got.iter().zip(&apart).enumerate() {
                    let want = linear(w, &x, compact).unwrap();
                    assert_eq!(g.dims(), want.dims(), "part {i}, {m} rows");
                    assert!(g.is_contiguous());
                    let (g, want) = (values(g), values(&want));
                    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let err = g
                        .iter()
                        .zip(&want)
                        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                    assert!(
                        scale > 0.0 && err <= 1e-6 * scale,
                        "part {i}, {m} rows, compact {compact}: {err} of {scale}"
                    );
                }
            }
        }
    }

    #[test]
    fn stacked_outputs_lie_side_by_side_in_order() {
        let cols = 256;
        let shared = SharedInput::new(vec![
            weight(16, cols, GgmlDType::Q4K, 1),
            weight(32, cols, GgmlDType::Q4K, 2),
        ])
        .unwrap();
        let x = Tensor::from_vec(seeded(2 * cols, 3), (1, 2, cols), &Device::Cpu).unwrap();
        let stacked = shared.forward_stacked(&x, false).unwrap();
        let [(y, widths)] = stacked.as_slice() else {
            panic!("one matrix expected, got {}", stacked.len());
        };
        assert_eq!(*widths, &[16, 32][..]);
        assert_eq!(y.dims(), &[1, 2, 48]);
        let parts = shared.forward(&x, false).unwrap();
        assert_eq!(parts[0].dims(), &[1, 2, 16]);
        let y = y.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let p1 = parts[1].squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        for (row, p) in y.iter().zip(&p1) {
            assert_eq!(&row[16..], p.as_slice());
        }
    }
}
