//! Writing GGUF files tensor by tensor. The header (metadata, then every tensor's name, shape,
//! type and offset) is known before any weight is made, so a 7B model is written holding one
//! tensor at a time, never the whole model: candle's own writer takes every tensor at once.
//!
//! The file goes to a temporary name beside the target and is renamed into place once complete
//! and synced, so a crash or a full disk never leaves a truncated file under the real name.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;

/// Tensor data starts at multiples of this, as llama.cpp's `general.alignment` default.
pub const ALIGNMENT: u64 = 32;

/// One tensor of the file: its name, its shape as candle orders it (rows first) and its type.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl PlannedTensor {
    /// Bytes of the tensor's data: whole blocks of its type along each row.
    pub fn size_in_bytes(&self) -> usize {
        let elements: usize = self.dims.iter().product();
        elements / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// Whether a tensor of `dims` can be stored as `dtype`: its rows must be whole blocks.
pub fn fits_blocks(dims: &[usize], dtype: GgmlDType) -> bool {
    dims.last()
        .is_some_and(|cols| cols.is_multiple_of(dtype.block_size()))
}

/// GGML's number for a tensor type, as GGUF stores it.
fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_str(w, s),
        Value::Array(items) => {
            let elem = items.first().map_or(4, value_type_id);
            if items.iter().any(|i| value_type_id(i) != elem) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a GGUF array holds values of one type",
                ));
            }
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
    }
}

fn padding(pos: u64) -> usize {
    ((ALIGNMENT - pos % ALIGNMENT) % ALIGNMENT) as usize
}

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
}

/// The size of the file `metadata` and `tensors` make, before writing it (for the disk check).
pub fn planned_size(metadata: &[(String, Value)], tensors: &[PlannedTensor]) -> u64 {
    let mut header = Vec::new();
    // Writing into memory cannot fail.
    let _ = write_header(&mut header, metadata, tensors);
    let mut size = header.len() as u64;
    size += padding(size) as u64;
    for t in tensors {
        size += t.size_in_bytes() as u64;
        size += padding(size) as u64;
    }
    size
}

fn write_header(
    w: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[PlannedTensor],
) -> std::io::Result<()> {
    w.write_all(b"GGUF")?;
    w.write_all(&3u32.to_le_bytes())?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())?;
    w.write_all(&(metadata.len() as u64).to_le_bytes())?;
    for (key, value) in metadata {
        write_str(w, key)?;
        w.write_all(&value_type_id(value).to_le_bytes())?;
        write_value(w, value)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        write_str(w, &t.name)?;
        w.write_all(&(t.dims.len() as u32).to_le_bytes())?;
        // GGUF lists the innermost dimension first.
        for &d in t.dims.iter().rev() {
            w.write_all(&(d as u64).to_le_bytes())?;
        }
        w.write_all(&ggml_type_id(t.dtype).to_le_bytes())?;
        w.write_all(&offset.to_le_bytes())?;
        offset += t.size_in_bytes() as u64;
        offset += padding(offset) as u64;
    }
    Ok(())
}

/// Writes `path`: the header first, then each tensor's bytes as `data` makes them, in order
/// (`data(i, tensor)` for the `i`-th planned tensor). Nothing is left at `path` on failure.
pub fn write_gguf_streaming(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[PlannedTensor],
    mut data: impl FnMut(usize, &PlannedTensor) -> Result<Vec<u8>, WriteError>,
) -> Result<(), WriteError> {
    let tmp = temp_path(path);
    let io = |source| WriteError::Io {
        path: tmp.clone(),
        source,
    };
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut header = Vec::new();
        write_header(&mut header, metadata, tensors).map_err(io)?;
        w.write_all(&header).map_err(io)?;
        let mut pos = header.len() as u64;
        let pad = padding(pos);
        w.write_all(&vec![0u8; pad]).map_err(io)?;
        pos += pad as u64;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = data(i, t)?;
            if bytes.len() != t.size_in_bytes() {
                return Err(WriteError::Tensor {
                    name: t.name.clone(),
                    message: format!(
                        "{} bytes made, {} planned for {:?} {:?}",
                        bytes.len(),
                        t.size_in_bytes(),
                        t.dtype,
                        t.dims
                    ),
                });
            }
            w.write_all(&bytes).map_err(io)?;
            pos += bytes.len() as u64;
            let pad = padding(pos);
            w.write_all(&vec![0u8; pad]).map_err(io)?;
            pos += pad as u64;
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|source| WriteError::Io {
            path: path.to_path_buf(),
            source,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A name beside `path` no other writer uses.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.partial", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QTensor, gguf_file};
    use candle_core::{Device, Tensor};

    fn ramp(dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    #[test]
    fn a_streamed_file_reads_back_as_candle_wrote_it() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = [
            ("a.weight", vec![4, 256], GgmlDType::Q4K),
            ("b.weight", vec![256], GgmlDType::F32),
            ("c.weight", vec![3, 64], GgmlDType::Q8_0),
            ("d.weight", vec![2, 256], GgmlDType::Q6K),
            ("e.weight", vec![5, 7], GgmlDType::F16),
        ];
        let quantized: Vec<QTensor> = tensors
            .iter()
            .map(|(_, d, t)| QTensor::quantize(&ramp(d), *t).unwrap())
            .collect();
        let plan: Vec<PlannedTensor> = tensors
            .iter()
            .map(|(n, d, t)| PlannedTensor {
                name: n.to_string(),
                dims: d.clone(),
                dtype: *t,
            })
            .collect();
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("x.count".to_string(), Value::U32(7)),
            (
                "x.list".to_string(),
                Value::Array(vec![Value::F32(-1.5), Value::F32(2.0)]),
            ),
            ("x.flag".to_string(), Value::Bool(true)),
        ];
        let path = dir.path().join("m.gguf");
        write_gguf_streaming(&path, &metadata, &plan, |i, _| {
            Ok(quantized[i].data().unwrap().into_owned())
        })
        .unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            planned_size(&metadata, &plan)
        );
        let mut f = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        assert_eq!(content.metadata["x.count"].to_u32().unwrap(), 7);
        assert!(content.metadata["x.flag"].to_bool().unwrap());
        let list = content.metadata["x.list"].to_vec().unwrap();
        assert_eq!(list[0].to_f32().unwrap(), -1.5);
        for ((name, dims, dtype), q) in tensors.iter().zip(&quantized) {
            let back = content.tensor(&mut f, name, &Device::Cpu).unwrap();
            assert_eq!(back.shape().dims(), dims.as_slice(), "{name}");
            assert_eq!(back.dtype(), *dtype, "{name}");
            assert_eq!(back.data().unwrap(), q.data().unwrap(), "{name}");
        }
        // Nothing is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_tensor_of_the_wrong_size_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let plan = [PlannedTensor {
            name: "a".into(),
            dims: vec![2, 32],
            dtype: GgmlDType::Q8_0,
        }];
        let err = write_gguf_streaming(&path, &[], &plan, |_, _| Ok(vec![0u8; 3])).unwrap_err();
        assert!(
            err.to_string().contains("3 bytes made, 68 planned"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn rows_must_be_whole_blocks() {
        assert!(fits_blocks(&[3, 512], GgmlDType::Q4K));
        assert!(!fits_blocks(&[3, 96], GgmlDType::Q4K));
        assert!(fits_blocks(&[3, 96], GgmlDType::Q8_0));
        assert!(!fits_blocks(&[], GgmlDType::Q8_0));
    }
}
