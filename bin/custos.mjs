#!/usr/bin/env node
// Entry point for `npx custos`: runs the TypeScript CLI through tsx's loader, so that a fresh clone
// needs no build step (see docs/adr/0001-layout-and-toolchain.md).
import { register } from 'tsx/esm/api';
register();
await import('../src/cli/main.ts');
