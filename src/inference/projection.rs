//! Products of a step's activations with the model's weights: several weights sharing an input
//! computed together, quantised weights through candle's kernels (repacked copies) or, with
//! compact CPU weights, through ours on the stored blocks.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Module, Tensor};

use super::kernels;

/// Rows of a decode step (one per sequence) up to which projections sharing an input are
/// computed together; longer prompt chunks take candle's matrix kernels one weight at a time.
const FUSED_ROWS: usize = 16;

/// `x · wᵀ` for several weights sharing the input `x` (q/k/v, gate/up). Quantised weights of
/// one type go through candle's fused kernel: the input is quantised once and one pass of the
/// thread pool covers all of them. Anything else is multiplied one weight at a time.
pub(crate) fn project(
    ws: &[&QMatMul],
    x: &Tensor,
    compact: bool,
) -> candle_core::Result<Vec<Tensor>> {
    if compact && let Some(ys) = quantised(ws, x)? {
        return Ok(ys);
    }
    let rows = x.elem_count() / x.dim(D::Minus1)?;
    let mut out: Vec<Option<Tensor>> = vec![None; ws.len()];
    if rows <= FUSED_ROWS && x.device().is_cpu() && x.dtype() == DType::F32 {
        let quantised: Vec<(usize, &QTensor)> = ws
            .iter()
            .enumerate()
            .filter_map(|(i, w)| match w {
                QMatMul::QTensor(t) => Some((i, t.as_ref())),
                _ => None,
            })
            .collect();
        let mut dtypes = Vec::new();
        for (_, t) in &quantised {
            if !dtypes.contains(&t.dtype()) {
                dtypes.push(t.dtype());
            }
        }
        for dtype in dtypes {
            let group: Vec<(usize, &QTensor)> = quantised
                .iter()
                .copied()
                .filter(|(_, t)| t.dtype() == dtype)
                .collect();
            if group.len() < 2 {
                continue;
            }
            let ts: Vec<&QTensor> = group.iter().map(|(_, t)| *t).collect();
            if let Some(ys) = QTensor::gemv_fused_shared_lhs(&ts, x)? {
                for ((i, _), y) in group.iter().zip(ys) {
                    out[*i] = Some(y);
                }
            }
        }
    }
    ws.iter()
        .zip(out)
        .map(|(w, y)| match y {
            Some(y) => Ok(y),
            None => linear(w, x, false),
        })
        .collect()
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
