import { createCipheriv, createDecipheriv, randomBytes, randomUUID } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * A STUB of AWS KMS for tests — not KMS, not an emulator of it: a local HTTP server speaking the
 * subset of the KMS JSON 1.1 protocol (X-Amz-Target `TrentService.*`) that the aws-kms provider
 * uses: CreateKey, Encrypt, Decrypt, DisableKey, ScheduleKeyDeletion.
 *
 * What it does like KMS: real AES-256-GCM inside, one random key per CreateKey; the encryption
 * context is authenticated as GCM AAD, so Decrypt with a different context fails with
 * InvalidCiphertextException; key states Enabled / Disabled / PendingDeletion with KMS's errors
 * (DisabledException, KMSInvalidStateException, NotFoundException, IncorrectKeyException) and
 * KMS's 7–30 day deletion window. What it does not: SigV4 is not verified (it only insists that an
 * Authorization header is present), no key policies, grants, aliases or other operations, and its
 * ciphertext format (`0x01 ‖ key uuid (16) ‖ nonce (12) ‖ ciphertext ‖ tag (16)`) is its own.
 */
export interface KmsStubRequest {
  target: string;
  hasAuthorization: boolean;
  /** The Host header as received. */
  host: string;
}

interface StubKey {
  id: string;
  arn: string;
  material: Buffer;
  state: 'Enabled' | 'Disabled' | 'PendingDeletion';
  created: number;
  description: string;
}

export interface KmsStub {
  /** http://127.0.0.1:PORT */
  url: string;
  region: string;
  /** Every request received, in order. */
  requests: KmsStubRequest[];
  /** The state of a key, for assertions (undefined when unknown). */
  keyState(keyIdOrArn: string): StubKey['state'] | undefined;
  close(): Promise<void>;
}

class KmsError extends Error {
  constructor(
    readonly type: string,
    message: string,
    readonly status = 400,
  ) {
    super(message);
  }
}

const ACCOUNT = '111122223333';

/** Starts the stub on 127.0.0.1 (a free port unless `port` is given). */
export async function startKmsStub(opts: { region?: string; port?: number } = {}): Promise<KmsStub> {
  const region = opts.region ?? 'us-east-1';
  const keys = new Map<string, StubKey>();
  const requests: KmsStubRequest[] = [];

  const find = (keyId: unknown): StubKey => {
    if (typeof keyId !== 'string' || keyId.length === 0)
      throw new KmsError('ValidationException', 'KeyId is required');
    const id = keyId.startsWith('arn:') ? keyId.slice(keyId.lastIndexOf('/') + 1) : keyId;
    const k = keys.get(id);
    if (!k || (keyId.startsWith('arn:') && k.arn !== keyId)) {
      throw new KmsError('NotFoundException', `Key '${keyId}' does not exist`);
    }
    return k;
  };
  const usable = (k: StubKey): void => {
    if (k.state === 'Disabled') throw new KmsError('DisabledException', `${k.arn} is disabled.`);
    if (k.state === 'PendingDeletion') {
      throw new KmsError('KMSInvalidStateException', `${k.arn} is pending deletion.`);
    }
  };
  const contextAad = (ctx: unknown): Buffer => {
    if (ctx === undefined) return Buffer.alloc(0);
    if (!ctx || typeof ctx !== 'object')
      throw new KmsError('ValidationException', 'EncryptionContext must be a map');
    // Canonical form: sorted pairs, so the same map always gives the same AAD.
    const entries = Object.entries(ctx as Record<string, unknown>).sort(([a], [b]) =>
      a < b ? -1 : a > b ? 1 : 0,
    );
    for (const [, v] of entries) {
      if (typeof v !== 'string')
        throw new KmsError('ValidationException', 'EncryptionContext values must be strings');
    }
    return Buffer.from(JSON.stringify(entries), 'utf8');
  };
  const blob = (v: unknown, name: string): Buffer => {
    if (typeof v !== 'string' || v.length === 0)
      throw new KmsError('ValidationException', `${name} is required`);
    return Buffer.from(v, 'base64');
  };
  const uuidBytes = (id: string) => Buffer.from(id.replace(/-/g, ''), 'hex');
  const uuidOf = (b: Buffer) =>
    [b.subarray(0, 4), b.subarray(4, 6), b.subarray(6, 8), b.subarray(8, 10), b.subarray(10, 16)]
      .map((x) => x.toString('hex'))
      .join('-');

  const ops: Record<string, (body: Record<string, unknown>) => unknown> = {
    CreateKey(body) {
      const spec = body.KeySpec ?? 'SYMMETRIC_DEFAULT';
      const usage = body.KeyUsage ?? 'ENCRYPT_DECRYPT';
      if (spec !== 'SYMMETRIC_DEFAULT' || usage !== 'ENCRYPT_DECRYPT') {
        throw new KmsError('UnsupportedOperationException', 'the stub only makes SYMMETRIC_DEFAULT keys');
      }
      const id = randomUUID();
      const k: StubKey = {
        id,
        arn: `arn:aws:kms:${region}:${ACCOUNT}:key/${id}`,
        material: randomBytes(32),
        state: 'Enabled',
        created: Date.now() / 1000,
        description: typeof body.Description === 'string' ? body.Description : '',
      };
      keys.set(id, k);
      return {
        KeyMetadata: {
          AWSAccountId: ACCOUNT,
          KeyId: id,
          Arn: k.arn,
          CreationDate: k.created,
          Enabled: true,
          Description: k.description,
          KeyUsage: 'ENCRYPT_DECRYPT',
          KeyState: 'Enabled',
          Origin: 'AWS_KMS',
          KeyManager: 'CUSTOMER',
          KeySpec: 'SYMMETRIC_DEFAULT',
          CustomerMasterKeySpec: 'SYMMETRIC_DEFAULT',
          EncryptionAlgorithms: ['SYMMETRIC_DEFAULT'],
          MultiRegion: false,
        },
      };
    },
    Encrypt(body) {
      const k = find(body.KeyId);
      usable(k);
      const plain = blob(body.Plaintext, 'Plaintext');
      if (plain.length < 1 || plain.length > 4096)
        throw new KmsError('ValidationException', 'Plaintext length');
      const nonce = randomBytes(12);
      const c = createCipheriv('aes-256-gcm', k.material, nonce);
      c.setAAD(contextAad(body.EncryptionContext));
      const ct = Buffer.concat([c.update(plain), c.final()]);
      const out = Buffer.concat([Buffer.of(1), uuidBytes(k.id), nonce, ct, c.getAuthTag()]);
      return {
        CiphertextBlob: out.toString('base64'),
        KeyId: k.arn,
        EncryptionAlgorithm: 'SYMMETRIC_DEFAULT',
      };
    },
    Decrypt(body) {
      const b = blob(body.CiphertextBlob, 'CiphertextBlob');
      if (b.length < 1 + 16 + 12 + 1 + 16 || b[0] !== 1) throw new KmsError('InvalidCiphertextException', '');
      const embedded = uuidOf(b.subarray(1, 17));
      let k: StubKey;
      if (body.KeyId !== undefined) {
        k = find(body.KeyId);
        if (k.id !== embedded) {
          throw new KmsError(
            'IncorrectKeyException',
            'The key ID in the request does not identify a KMS key that can decrypt the ciphertext.',
          );
        }
      } else {
        const e = keys.get(embedded);
        if (!e) throw new KmsError('InvalidCiphertextException', '');
        k = e;
      }
      usable(k);
      try {
        const d = createDecipheriv('aes-256-gcm', k.material, b.subarray(17, 29));
        d.setAAD(contextAad(body.EncryptionContext));
        d.setAuthTag(b.subarray(b.length - 16));
        const plain = Buffer.concat([d.update(b.subarray(29, b.length - 16)), d.final()]);
        return {
          KeyId: k.arn,
          Plaintext: plain.toString('base64'),
          EncryptionAlgorithm: 'SYMMETRIC_DEFAULT',
        };
      } catch {
        throw new KmsError('InvalidCiphertextException', '');
      }
    },
    DisableKey(body) {
      const k = find(body.KeyId);
      if (k.state === 'PendingDeletion') {
        throw new KmsError('KMSInvalidStateException', `${k.arn} is pending deletion.`);
      }
      k.state = 'Disabled';
      return {};
    },
    ScheduleKeyDeletion(body) {
      const k = find(body.KeyId);
      const days = body.PendingWindowInDays ?? 30;
      if (typeof days !== 'number' || !Number.isInteger(days) || days < 7 || days > 30) {
        throw new KmsError('ValidationException', 'PendingWindowInDays must be between 7 and 30');
      }
      if (k.state === 'PendingDeletion') {
        throw new KmsError('KMSInvalidStateException', `${k.arn} is pending deletion.`);
      }
      k.state = 'PendingDeletion';
      k.material.fill(0);
      return {
        KeyId: k.arn,
        DeletionDate: Date.now() / 1000 + days * 86400,
        KeyState: 'PendingDeletion',
        PendingWindowInDays: days,
      };
    },
  };

  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const target = String(req.headers['x-amz-target'] ?? '');
      const hasAuthorization =
        typeof req.headers.authorization === 'string' && req.headers.authorization.length > 0;
      requests.push({ target, hasAuthorization, host: String(req.headers.host ?? '') });
      const send = (status: number, body: unknown) => {
        const text = JSON.stringify(body);
        res.writeHead(status, {
          'content-type': 'application/x-amz-json-1.1',
          'content-length': Buffer.byteLength(text),
          'x-amzn-requestid': randomUUID(),
        });
        res.end(text);
      };
      try {
        if (req.method !== 'POST') throw new KmsError('UnknownOperationException', '', 404);
        if (!hasAuthorization)
          throw new KmsError('MissingAuthenticationTokenException', 'Missing Authentication Token');
        const [service, op] = target.split('.');
        const fn = service === 'TrentService' && op ? ops[op] : undefined;
        if (!fn) throw new KmsError('UnknownOperationException', '');
        let body: Record<string, unknown>;
        try {
          body = JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}') as Record<string, unknown>;
        } catch {
          throw new KmsError('SerializationException', '');
        }
        send(200, fn(body));
      } catch (e) {
        if (e instanceof KmsError) send(e.status, { __type: e.type, message: e.message });
        else send(500, { __type: 'KMSInternalException', message: '' });
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(opts.port ?? 0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    region,
    requests,
    keyState(keyIdOrArn) {
      const id = keyIdOrArn.startsWith('arn:')
        ? keyIdOrArn.slice(keyIdOrArn.lastIndexOf('/') + 1)
        : keyIdOrArn;
      return keys.get(id)?.state;
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
