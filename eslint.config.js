// Lint, including the architecture rules of DESIGN.md that CI enforces (test/dependency-rule.test.ts
// proves each one bites).
import js from '@eslint/js';
import tseslint from 'typescript-eslint';
import custos from './eslint-rules/no-outbound-client.js';

/** Rule 1: only the PHI gateway (src/phi) reaches the resource store. */
export const STORE_RULE = {
  group: [
    '**/store/resource-store',
    '**/store/resource-store.ts',
    '**/store/resource-store.js',
    '**/store/search-sql',
    '**/store/search-sql.ts',
    '**/store/search-sql.js',
  ],
  message: 'Only the PHI gateway (src/phi) may import the resource store: ask the gateway instead.',
};

/** Rule 1 too: only the gateway reaches the crypto module (the composition root wires it). */
export const CRYPTO_RULE = {
  group: ['**/crypto/*'],
  message: 'Only the PHI gateway (src/phi) may use src/crypto: ask the gateway instead.',
};

/** Outbound connections go through the egress port (src/egress) only. */
const OUTBOUND_IMPORTS = [
  { name: 'undici', message: 'Outbound connections go through src/egress.' },
  { name: 'axios', message: 'Outbound connections go through src/egress.' },
  { name: 'node-fetch', message: 'Outbound connections go through src/egress.' },
  { name: 'nodemailer', message: 'E-mail goes out through src/egress/smtp-mailer.ts.' },
  ...['http', 'https', 'node:http', 'node:https'].map((name) => ({
    name,
    importNames: ['request', 'get', 'Agent', 'ClientRequest'],
    message: 'Outbound connections go through src/egress (listeners are fine).',
  })),
  ...['net', 'tls', 'node:net', 'node:tls'].map((name) => ({
    name,
    importNames: ['connect', 'createConnection', 'Socket'],
    message: 'Outbound connections go through src/egress (listeners are fine).',
  })),
];

export default tseslint.config(
  { ignores: ['node_modules/**', '.custos/**', 'coverage/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      '@typescript-eslint/no-empty-function': 'off',
    },
  },
  {
    files: ['src/**/*.ts'],
    plugins: { custos },
    rules: {
      'no-console': 'error',
      // Default and namespace imports, require, import(), globalThis.fetch (ADR 0009).
      'custos/no-outbound-client': 'error',
      'no-restricted-imports': ['error', { paths: OUTBOUND_IMPORTS, patterns: [STORE_RULE, CRYPTO_RULE] }],
      'no-restricted-globals': [
        'error',
        ...['fetch', 'WebSocket', 'EventSource', 'XMLHttpRequest'].map((name) => ({
          name,
          message: 'Outbound connections go through src/egress.',
        })),
      ],
    },
  },
  {
    // The gateway may import the store and the crypto module.
    files: ['src/phi/**/*.ts'],
    rules: { 'no-restricted-imports': ['error', { paths: OUTBOUND_IMPORTS }] },
  },
  {
    // The store may import itself, but not the crypto module.
    files: ['src/store/**/*.ts'],
    rules: { 'no-restricted-imports': ['error', { paths: OUTBOUND_IMPORTS, patterns: [CRYPTO_RULE] }] },
  },
  {
    // The crypto module itself, and the composition root that wires the key provider into the gateway.
    files: ['src/crypto/**/*.ts', 'src/server.ts'],
    rules: { 'no-restricted-imports': ['error', { paths: OUTBOUND_IMPORTS, patterns: [STORE_RULE] }] },
  },
  {
    files: ['src/egress/**/*.ts'],
    rules: {
      'no-restricted-imports': ['error', { patterns: [STORE_RULE] }],
      'no-restricted-globals': 'off',
      'custos/no-outbound-client': 'off',
    },
  },
  {
    files: ['src/cli/**/*.ts', 'bench/**/*.ts', 'scripts/**/*.ts', 'test/**/*.ts', 'bin/**'],
    rules: { 'no-console': 'off' },
  },
  {
    // Tests read FHIR JSON responses loosely.
    files: ['test/**/*.ts'],
    rules: { '@typescript-eslint/no-explicit-any': 'off' },
  },
  {
    files: ['**/*.js', '**/*.mjs'],
    languageOptions: { globals: { process: 'readonly', console: 'readonly' } },
  },
);
