// Next's generated next-env.d.ts declares these too, but it only exists after a build.
declare module '*.css';
