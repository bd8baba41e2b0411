//! The convolutional layers of the UNet and the VAE: convolution, group norm, the resnet block
//! and the up/down samplers, with diffusers' parameter names.
//!
//! On the CPU in f32 they run [`super::cpu`]'s kernels (fused bias / timestep / shortcut adds,
//! fused GroupNorm+SiLU, upsampling folded into the convolution); on any other device or dtype
//! they run candle's ops, the same arithmetic. The attention layers stay candle's.

use candle_core::{DType, Device, Layout, Module, Result, Storage, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

use super::cpu::{self, ConvGeom, Prefill};

/// The f32 contents of a contiguous CPU tensor (`None` for any other).
pub(crate) fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<f32>().ok()?;
            let (start, end) = layout.contiguous_offsets()?;
            Some(&all[start..end])
        }
        _ => None,
    }
}

fn fast_path(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// A 2-D convolution, `weight` `[cout, cin, k, k]` and `bias` `[cout]`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    k: usize,
    stride: usize,
    /// (top, left, bottom, right).
    padding: (usize, usize, usize, usize),
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        Self::with_padding(vb, cin, cout, k, stride, (pad, pad, pad, pad))
    }

    /// The same initialisation hints as `candle_nn::conv2d` (they only matter for random weights).
    pub fn with_padding(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: (usize, usize, usize, usize),
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (cout, cin, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bound = 1. / ((cin * k * k) as f64).sqrt();
        let bias = vb.get_with_hints(
            cout,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Self {
            weight,
            bias,
            k,
            stride,
            padding,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_fused(xs, false, None, None)
    }

    /// `conv(up2(xs)) + channel[.., :, None, None] + residual`, where `up2` is an optional
    /// nearest 2× upsampling, `channel` is `[1 or n, cout]` and `residual` the output's shape.
    pub fn forward_fused(
        &self,
        xs: &Tensor,
        up2: bool,
        channel: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (n, cin, h, w) = xs.dims4()?;
        let cout = self.weight.dim(0)?;
        let up = if up2 { 2 } else { 1 };
        let geom = ConvGeom::with_padding(cin, h, w, cout, self.k, self.stride, self.padding, up);
        if fast_path(xs) && fast_path(&self.weight) {
            return self.forward_cpu(xs, n, &geom, channel, residual);
        }
        let xs = if up2 {
            xs.upsample_nearest2d(2 * h, 2 * w)?
        } else {
            xs.clone()
        };
        let (t, l, b, r) = self.padding;
        let symmetric = t == l && t == b && t == r;
        let (xs, pad) = if symmetric {
            (xs, t)
        } else {
            (xs.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?, 0)
        };
        let out = xs.conv2d(&self.weight, pad, self.stride, 1, 1)?;
        let mut out = out.broadcast_add(&self.bias.reshape((1, cout, 1, 1))?)?;
        if let Some(c) = channel {
            out = out.broadcast_add(&c.reshape((c.dim(0)?, cout, 1, 1))?)?;
        }
        if let Some(r) = residual {
            out = (out + r)?;
        }
        Ok(out)
    }

    fn forward_cpu(
        &self,
        xs: &Tensor,
        n: usize,
        geom: &ConvGeom,
        channel: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let plane_in = geom.cin * geom.h * geom.w;
        let plane_out = geom.cout * geom.ho * geom.wo;
        let xs = xs.contiguous()?;
        let bias = self.bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let channel = match channel {
            Some(c) => {
                let rows = c.dim(0)?;
                if rows != 1 && rows != n {
                    candle_core::bail!("per-channel add has {rows} rows for a batch of {n}");
                }
                Some((
                    rows,
                    c.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                ))
            }
            None => None,
        };
        let residual = match residual {
            Some(r) => {
                if r.dims() != [n, geom.cout, geom.ho, geom.wo] {
                    candle_core::bail!(
                        "residual {:?} does not match the output {:?}",
                        r.dims(),
                        (n, geom.cout, geom.ho, geom.wo)
                    );
                }
                Some(r.to_dtype(DType::F32)?.contiguous()?)
            }
            None => None,
        };
        let mut out = vec![0f32; n * plane_out];
        {
            let (xst, xl) = xs.storage_and_layout();
            let (wst, wl) = self.weight.storage_and_layout();
            let rguard = residual.as_ref().map(|r| r.storage_and_layout());
            let (Some(x), Some(weight)) = (cpu_f32(&xst, xl), cpu_f32(&wst, wl)) else {
                candle_core::bail!("conv2d fast path needs contiguous f32 CPU tensors");
            };
            let res = match &rguard {
                Some((s, l)) => Some(cpu_f32(s, l).ok_or_else(|| {
                    candle_core::Error::Msg("residual is not a CPU f32 tensor".into())
                })?),
                None => None,
            };
            let weight = match self.weight.layout().is_contiguous() {
                true => weight,
                false => candle_core::bail!("conv2d weight is not contiguous"),
            };
            let winograd =
                cpu::use_winograd(geom).then(|| cpu::winograd_weights(weight, geom.cout, geom.cin));
            for (i, o) in out.chunks_exact_mut(plane_out).enumerate() {
                let chan = channel.as_ref().map(|(rows, v)| {
                    let r = if *rows == 1 { 0 } else { i };
                    &v[r * geom.cout..(r + 1) * geom.cout]
                });
                let pre = Prefill {
                    bias: Some(&bias),
                    channel: chan,
                    residual: res.map(|r| &r[i * plane_out..(i + 1) * plane_out]),
                };
                let xi = &x[i * plane_in..(i + 1) * plane_in];
                match &winograd {
                    Some(u) => cpu::conv2d_image_winograd(xi, geom, u, &pre, o),
                    None => cpu::conv2d_image(xi, geom, weight, &pre, o),
                }
            }
        }
        Tensor::from_vec(out, (n, geom.cout, geom.ho, geom.wo), &Device::Cpu)
    }
}

/// Group norm with an optional SiLU after it (every use in the UNet and VAE but the attention
/// blocks' norms is followed by one).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!("group norm: {channels} channels do not split into {groups} groups");
        }
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.))?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        if dims.len() < 3 {
            candle_core::bail!("group norm expects [n, c, ...], got {dims:?}");
        }
        let c = dims[1];
        if fast_path(xs) && fast_path(&self.weight) {
            let hw: usize = dims[2..].iter().product();
            let xs = xs.contiguous()?;
            let gamma = self.weight.to_vec1::<f32>()?;
            let beta = self.bias.to_vec1::<f32>()?;
            let out = {
                let (st, l) = xs.storage_and_layout();
                let Some(x) = cpu_f32(&st, l) else {
                    candle_core::bail!("group norm fast path needs a contiguous f32 CPU tensor");
                };
                cpu::group_norm(x, c, hw, self.groups, self.eps, &gamma, &beta, silu)
            };
            return Tensor::from_vec(out, dims, &Device::Cpu);
        }
        let norm = candle_nn::GroupNorm::new(
            self.weight.clone(),
            self.bias.clone(),
            c,
            self.groups,
            self.eps,
        )?;
        let out = norm.forward(xs)?;
        if silu {
            candle_nn::ops::silu(&out)
        } else {
            Ok(out)
        }
    }
}

/// diffusers' `ResnetBlock2D` (the "default" time-embedding norm, no up/down inside).
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// The shape of one [`ResnetBlock`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub cin: usize,
    pub cout: usize,
    pub temb: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock {
    pub fn new(vb: VarBuilder, cfg: ResnetConfig) -> Result<Self> {
        let ResnetConfig { cin, cout, .. } = cfg;
        let time_emb_proj = match cfg.temb {
            Some(t) => Some(candle_nn::linear(t, cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if cin != cout {
            Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(vb.pp("norm2"), cfg.groups, cout, cfg.eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb` is `[1 or n, temb_channels]`: one row broadcasts to the whole batch.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(xs, true)?;
        let t = match (temb, &self.time_emb_proj) {
            (Some(temb), Some(proj)) => Some(proj.forward(&candle_nn::ops::silu(temb)?)?),
            _ => None,
        };
        let h = self.conv1.forward_fused(&h, false, t.as_ref(), None)?;
        let h = self.norm2.forward(&h, true)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = self.conv2.forward_fused(&h, false, None, Some(&shortcut))?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Downsample2D` with a convolution: stride 2, padding `pad`; padding 0 means
/// diffusers' asymmetric pad of one row and column on the far side (the VAE encoder's).
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    pub fn new(vb: VarBuilder, channels: usize, pad: usize) -> Result<Self> {
        let padding = if pad == 0 {
            (0, 0, 1, 1)
        } else {
            (pad, pad, pad, pad)
        };
        Ok(Self {
            conv: Conv2d::with_padding(vb.pp("conv"), channels, channels, 3, 2, padding)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv.forward(xs)
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest upsampling (2×, or to a given size),
/// then a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        match size {
            Some((th, tw)) if (th, tw) != (2 * h, 2 * w) => {
                self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
            }
            _ => self.conv.forward_fused(xs, true, None, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn input(shape: (usize, usize, usize, usize)) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The fast CPU path against candle's ops on the same weights: the fallback every other
    /// device runs.
    #[test]
    fn fast_path_matches_candle_ops() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let xs = input((2, 8, 9, 10));
        let temb = input((1, 1, 2, 12)).reshape((2, 12)).unwrap();
        let resnet = ResnetBlock::new(
            vb.pp("r"),
            ResnetConfig {
                cin: 8,
                cout: 16,
                temb: Some(12),
                groups: 4,
                eps: 1e-6,
                output_scale_factor: 1.0,
            },
        )
        .unwrap();
        let fast = resnet.forward(&xs, Some(&temb)).unwrap();
        // The same block through candle's ops: f64 tensors take the fallback path.
        let slow = {
            let r64 = ResnetBlock::new(
                VarBuilder::from_tensors(
                    vm.data()
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_tensor().to_dtype(DType::F64).unwrap()))
                        .collect(),
                    DType::F64,
                    &Device::Cpu,
                )
                .pp("r"),
                ResnetConfig {
                    cin: 8,
                    cout: 16,
                    temb: Some(12),
                    groups: 4,
                    eps: 1e-6,
                    output_scale_factor: 1.0,
                },
            )
            .unwrap();
            r64.forward(
                &xs.to_dtype(DType::F64).unwrap(),
                Some(&temb.to_dtype(DType::F64).unwrap()),
            )
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
        };
        assert!(
            max_diff(&fast, &slow) < 1e-4,
            "resnet: {}",
            max_diff(&fast, &slow)
        );

        let up = Upsample::new(vb.pp("u"), 8).unwrap();
        let fused = up.forward(&xs, None).unwrap();
        let plain = up
            .conv
            .forward(&xs.upsample_nearest2d(18, 20).unwrap())
            .unwrap();
        assert!(max_diff(&fused, &plain) < 1e-5);
        let slow = xs
            .upsample_nearest2d(18, 20)
            .unwrap()
            .conv2d(&up.conv.weight, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&up.conv.bias.reshape((1, 8, 1, 1)).unwrap())
            .unwrap();
        assert!(max_diff(&fused, &slow) < 1e-4);

        for pad in [0, 1] {
            let down = Downsample::new(vb.pp(format!("d{pad}")), 8, pad).unwrap();
            let fast = down.forward(&xs).unwrap();
            let padded = if pad == 0 {
                xs.pad_with_zeros(2, 0, 1)
                    .unwrap()
                    .pad_with_zeros(3, 0, 1)
                    .unwrap()
            } else {
                xs.clone()
            };
            let slow = padded
                .conv2d(&down.conv.weight, pad, 2, 1, 1)
                .unwrap()
                .broadcast_add(&down.conv.bias.reshape((1, 8, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(fast.dims(), slow.dims());
            assert!(max_diff(&fast, &slow) < 1e-4, "downsample pad {pad}");
        }
    }

    #[test]
    fn a_batch_is_bit_identical_to_single_images() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let resnet = ResnetBlock::new(
            vb,
            ResnetConfig {
                cin: 32,
                cout: 64,
                temb: Some(16),
                groups: 8,
                eps: 1e-5,
                output_scale_factor: 1.0,
            },
        )
        .unwrap();
        let xs = input((3, 32, 24, 40));
        let temb = input((1, 1, 1, 16)).reshape((1, 16)).unwrap();
        let batch = resnet.forward(&xs, Some(&temb)).unwrap();
        for i in 0..3 {
            let one = resnet
                .forward(&xs.narrow(0, i, 1).unwrap(), Some(&temb))
                .unwrap();
            assert_eq!(max_diff(&batch.narrow(0, i, 1).unwrap(), &one), 0.0);
        }
    }
}
