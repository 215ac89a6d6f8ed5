import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  SignedNoteError,
  formatCheckpoint,
  formatVerifierKey,
  keyId,
  parseCheckpoint,
  parseSignerKey,
  parseVerifierKey,
  signNote,
  verifyNote,
} from '../src/audit/signed-note.ts';

const VECTORS = resolve(fileURLToPath(import.meta.url), '../../../shared/data/tlog-vectors');
const NOTES = join(VECTORS, 'signed-notes.json');
const SKIP = existsSync(NOTES) ? false : `test vectors not found at ${NOTES}`;

interface NoteVector {
  id: string;
  expect: 'valid' | 'invalid';
  vkey: string;
  skey?: string;
  text: string;
  signatures: { name: string; b64: string }[];
}

const serialize = (v: NoteVector): string =>
  `${v.text}\n${v.signatures.map((s) => `\u2014 ${s.name} ${s.b64}\n`).join('')}`;

function rawPublicKey(pub: import('node:crypto').KeyObject): Buffer {
  const der = pub.export({ format: 'der', type: 'spki' });
  return Buffer.from(der.subarray(der.length - 32));
}

function isCode(code: string) {
  return (e: unknown) => e instanceof SignedNoteError && e.code === code;
}

describe('signed-note: C2SP / golang.org/x/mod vectors', { skip: SKIP }, () => {
  const vectors = SKIP ? [] : (JSON.parse(readFileSync(NOTES, 'utf8')) as { vectors: NoteVector[] }).vectors;

  it('has 4 valid notes and 1 invalid', () => {
    assert.equal(vectors.filter((v) => v.expect === 'valid').length, 4);
    assert.equal(vectors.filter((v) => v.expect === 'invalid').length, 1);
  });

  for (const v of vectors) {
    it(`${v.id}: key ID recomputes and the note ${v.expect === 'valid' ? 'verifies' : 'fails'}`, () => {
      const key = parseVerifierKey(v.vkey);
      assert.equal(formatVerifierKey(key.name, key.publicKeyRaw), v.vkey);
      assert.deepEqual(keyId(key.name, key.publicKeyRaw), key.keyId);
      const expectedId = createHash('sha256')
        .update(Buffer.concat([Buffer.from(key.name), Buffer.from([0x0a, 0x01]), key.publicKeyRaw]))
        .digest()
        .subarray(0, 4);
      assert.deepEqual(key.keyId, expectedId);
      for (const s of v.signatures) {
        assert.deepEqual(Buffer.from(s.b64, 'base64').subarray(0, 4), key.keyId);
      }
      const note = serialize(v);
      if (v.expect === 'valid') {
        assert.deepEqual(verifyNote(note, [v.vkey]), { text: v.text, verifiedBy: [key.name] });
      } else {
        assert.throws(() => verifyNote(note, [v.vkey]), isCode('invalid_signature'));
      }
    });
  }

  it('a note signed by PeterNeumann and EnochRoot verifies with both keys, and with either one', () => {
    const pn = vectors.find((v) => v.id === 'go-sumdb-note-peterneumann')!;
    const er = vectors.find((v) => v.id === 'go-sumdb-note-enochroot-cosig')!;
    const note = `${pn.text}\n\u2014 PeterNeumann ${pn.signatures[0]!.b64}\n\u2014 EnochRoot ${er.signatures[0]!.b64}\n`;
    assert.deepEqual(verifyNote(note, [pn.vkey, er.vkey]).verifiedBy, ['PeterNeumann', 'EnochRoot']);
    assert.deepEqual(verifyNote(note, [er.vkey]).verifiedBy, ['EnochRoot']);
    assert.throws(
      () => verifyNote(note, ['example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k']),
      isCode('no_verified_signature'),
    );
  });

  it('re-signing the PeterNeumann text with its skey reproduces the published note byte for byte', () => {
    const v = vectors.find((x) => x.id === 'go-sumdb-note-peterneumann')!;
    const signer = parseSignerKey(v.skey!);
    assert.equal(signer.name, 'PeterNeumann');
    assert.equal(formatVerifierKey(signer.name, signer.publicKeyRaw), v.vkey);
    assert.equal(signNote(v.text, signer.name, signer.privateKey), serialize(v));
  });

  it('the sum.golang.org checkpoint parses', () => {
    const v = vectors.find((x) => x.id === 'sum-golang-org-checkpoint-35225469')!;
    const cp = parseCheckpoint(verifyNote(serialize(v), [v.vkey]).text);
    assert.equal(cp.origin, 'go.sum database tree');
    assert.equal(cp.size, 35225469);
    assert.equal(cp.rootHash.toString('base64'), 'vt5T6GaLCXvyHFl9VUvvItR43XZxfLgftEcTyO3eJCQ=');
    assert.deepEqual(cp.extensions, []);
    assert.equal(formatCheckpoint(cp.origin, cp.size, cp.rootHash), v.text);
  });
});

describe('signed-note: checkpoint round trip with a fresh Ed25519 key', () => {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  const name = 'custos.example/audit';
  const vkey = formatVerifierKey(name, rawPublicKey(publicKey));
  const root = createHash('sha256').update('root').digest();
  const text = formatCheckpoint('custos.example/audit', 42, root);
  const note = signNote(text, name, privateKey);

  it('formats the checkpoint and signature line as the specs say', () => {
    assert.equal(text, `custos.example/audit\n42\n${root.toString('base64')}\n`);
    const lines = note.split('\n');
    assert.equal(lines[3], '');
    assert.match(lines[4]!, /^\u2014 custos\.example\/audit [A-Za-z0-9+/]+=*$/u);
    assert.equal(Buffer.from(lines[4]!.split(' ')[2]!, 'base64').length, 68);
    assert.equal(lines[5], '');
  });

  it('verifies and parses back', () => {
    const { text: got, verifiedBy } = verifyNote(note, [vkey]);
    assert.equal(got, text);
    assert.deepEqual(verifiedBy, [name]);
    const cp = parseCheckpoint(got);
    assert.equal(cp.origin, 'custos.example/audit');
    assert.equal(cp.size, 42);
    assert.deepEqual(cp.rootHash, root);
  });

  it('fails with the wrong key', () => {
    const other = generateKeyPairSync('ed25519').publicKey;
    assert.throws(
      () => verifyNote(note, [formatVerifierKey(name, rawPublicKey(other))]),
      isCode('no_verified_signature'),
    );
    assert.throws(
      () => verifyNote(note, [formatVerifierKey('someone.else', rawPublicKey(publicKey))]),
      isCode('no_verified_signature'),
    );
  });

  it('fails when the text is altered', () => {
    const altered = note.replace('\n42\n', '\n43\n');
    assert.notEqual(altered, note);
    assert.throws(() => verifyNote(altered, [vkey]), isCode('invalid_signature'));
  });

  it('rejects malformed notes, keys and checkpoints', () => {
    assert.throws(() => signNote('no final newline', name, privateKey), isCode('malformed_note'));
    assert.throws(() => signNote(text, 'bad+name', privateKey), isCode('malformed_key'));
    assert.throws(() => signNote(text, name, publicKey), isCode('malformed_key'));
    assert.throws(() => verifyNote(text, [vkey]), isCode('malformed_note'));
    assert.throws(() => verifyNote(note.replace('\u2014', '-'), [vkey]), isCode('malformed_note'));
    assert.throws(() => verifyNote(note.slice(0, -1), [vkey]), isCode('malformed_note'));
    assert.throws(
      () => parseVerifierKey(vkey.replace(/\+[0-9a-f]{8}\+/u, '+00000000+')),
      isCode('malformed_key'),
    );
    assert.throws(
      () => parseCheckpoint('origin\n042\n' + root.toString('base64') + '\n'),
      isCode('malformed_checkpoint'),
    );
    assert.throws(() => parseCheckpoint('origin\n42\n'), isCode('malformed_checkpoint'));
    assert.throws(() => parseCheckpoint('origin\n42\nAAAA\n'), isCode('malformed_checkpoint'));
    assert.deepEqual(parseCheckpoint(`${text}ext line\n`).extensions, ['ext line']);
  });
});
