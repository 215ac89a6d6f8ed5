/**
 * Worker thread of `custos audit verify` (see audit-verify.ts): runs {@link processBatch} on the
 * batches it is sent and sends the results back, moving the hash buffers (and the batch's own buffer, back) rather than copying them.
 * @module
 */
import { parentPort } from 'node:worker_threads';
import { processBatch } from './verify-batch.ts';

const port = parentPort;
if (port) {
  port.on(
    'message',
    (m: { id: number; buf: ArrayBuffer; length: number; count: number; index?: boolean }) => {
      try {
        const r = processBatch(Buffer.from(m.buf, 0, m.length), m.count, m.index === true);
        // The batch's memory goes back too, for the next batch (CopySplitter.recycle).
        port.postMessage({ id: m.id, result: r, buf: m.buf }, [
          r.leafHashes.buffer as ArrayBuffer,
          r.roots.buffer as ArrayBuffer,
          m.buf,
        ]);
      } catch (e) {
        port.postMessage({ id: m.id, error: e instanceof Error ? e.message : 'worker failed' });
      }
    },
  );
  port.postMessage('ready');
}
