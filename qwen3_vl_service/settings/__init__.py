"""The settings: config.env plus the environment, validated once into a frozen ServiceConfig; profiles."""
