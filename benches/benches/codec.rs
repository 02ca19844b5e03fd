//! The per-message codec work: what a core does for every frame read and
//! the router for every message fanned out.

use bytes::Bytes;
use courier_benches::{masked_send_frame, message_frame};
use courier_protocol::frame::ClientFrame;
use courier_protocol::ws::{self, Decoder, Limits, Opcode, Role};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

fn inbound(c: &mut Criterion) {
    let raw = masked_send_frame(200);
    let limits = Limits {
        max_frame: 1 << 16,
        max_message: 1 << 16,
    };
    let mut group = c.benchmark_group("inbound");
    group.throughput(Throughput::Elements(1));
    group.bench_function("ws_decode_unmask_200b", |b| {
        let mut decoder = Decoder::new(Role::Server, limits);
        b.iter(|| decoder.decode(black_box(&raw)));
    });
    group.bench_function("ws_and_send_decode_200b", |b| {
        let mut decoder = Decoder::new(Role::Server, limits);
        b.iter(|| {
            if let Ok(Some((Some(ws::Event::Binary(payload)), _))) = decoder.decode(black_box(&raw))
            {
                black_box(ClientFrame::decode(&payload)).ok();
            }
        });
    });
    group.finish();
}

fn outbound(c: &mut Criterion) {
    let frame = message_frame(200);
    let mut group = c.benchmark_group("outbound");
    group.throughput(Throughput::Elements(1));
    group.bench_function("message_encode_and_frame_200b", |b| {
        b.iter(|| {
            let mut payload = Vec::with_capacity(320);
            black_box(&frame).encode(&mut payload);
            let mut out = Vec::with_capacity(payload.len() + ws::MAX_HEADER);
            ws::encode_frame(&mut out, Opcode::Binary, &payload, None);
            Bytes::from(out)
        });
    });
    let mut buf = vec![0u8; 4096];
    group.throughput(Throughput::Bytes(4096));
    group.bench_function("mask_4k", |b| {
        b.iter(|| ws::apply_mask(black_box(&mut buf), [1, 2, 3, 4]))
    });
    group.finish();
}

criterion_group!(benches, inbound, outbound);
criterion_main!(benches);
